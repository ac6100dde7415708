import pytest

from migu.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    square_size,
    summarize,
)

# R[i][j]: accuracy on task j after training task i.
R3 = [
    [80.0, 10.0, 20.0],
    [60.0, 90.0, 30.0],
    [50.0, 70.0, 95.0],
]
R0 = [5.0, 4.0, 10.0]


def test_three_tasks_hand_computed():
    # AA  = (50 + 70 + 95) / 3
    assert average_accuracy(R3) == pytest.approx(215 / 3)
    # BWT = ((50 - 80) + (70 - 90)) / 2 = -25
    assert backward_transfer(R3) == pytest.approx(-25.0)
    # F   = ((max(80, 60) - 50) + (90 - 70)) / 2 = 25
    assert forgetting(R3) == pytest.approx(25.0)
    # FWT = ((R[0][1] - r0[1]) + (R[1][2] - r0[2])) / 2 = ((10 - 4) + (30 - 10)) / 2 = 13
    assert forward_transfer(R3, R0) == pytest.approx(13.0)


def test_forgetting_differs_from_minus_bwt():
    # Task 0 rises after task 1 (40 -> 70), then drops to 50: BWT counts +10 for it, forgetting 20.
    R = [
        [40.0, 0.0, 0.0],
        [70.0, 60.0, 0.0],
        [50.0, 60.0, 80.0],
    ]
    assert backward_transfer(R) == pytest.approx(((50 - 40) + (60 - 60)) / 2)  # 5
    assert forgetting(R) == pytest.approx(((70 - 50) + (60 - 60)) / 2)  # 10
    assert forgetting(R) != pytest.approx(-backward_transfer(R))


def test_summarize_keys_and_values():
    s = summarize(R3, R0)
    assert set(s) == {"aa", "bwt", "fwt", "forgetting", "final_row", "diagonal"}
    assert s["aa"] == pytest.approx(215 / 3)
    assert s["bwt"] == pytest.approx(-25.0)
    assert s["fwt"] == pytest.approx(13.0)
    assert s["forgetting"] == pytest.approx(25.0)
    assert s["final_row"] == [50.0, 70.0, 95.0]
    assert s["diagonal"] == [80.0, 90.0, 95.0]


def test_single_task():
    R = [[42.0]]
    assert average_accuracy(R) == 42.0
    assert backward_transfer(R) is None
    assert forgetting(R) is None
    assert forward_transfer(R, [3.0]) is None
    assert summarize(R, [3.0]) == {
        "aa": 42.0, "bwt": None, "fwt": None, "forgetting": None, "final_row": [42.0], "diagonal": [42.0]
    }


def test_mtl_single_row():
    R = [[60.0, 70.0, 80.0]]
    s = summarize(R, R0)
    assert s["aa"] == pytest.approx(70.0)
    assert s["bwt"] is None and s["fwt"] is None and s["forgetting"] is None
    assert s["final_row"] == [60.0, 70.0, 80.0]
    assert s["diagonal"] is None


def test_unfinished_run_uses_square_part():
    # Two of three tasks finished; each row holds all three tasks' accuracies.
    R = [R3[0], R3[1]]
    assert square_size(R) == 2
    assert average_accuracy(R) == pytest.approx((60 + 90) / 2)
    assert backward_transfer(R) == pytest.approx(60 - 80)
    assert forgetting(R) == pytest.approx(80 - 60)
    assert forward_transfer(R, R0) == pytest.approx(10 - 4)
    # A half-written last row is ignored.
    assert square_size([R3[0], R3[1], [50.0]]) == 2
    # One finished sequential task read explicitly as such, not as an MTL row.
    assert summarize([R3[0]], R0, mtl=False)["aa"] == 80.0


def test_empty_and_missing_r0():
    assert summarize([], None) == {
        "aa": None, "bwt": None, "fwt": None, "forgetting": None, "final_row": [], "diagonal": []
    }
    assert forward_transfer(R3, None) is None


def test_integer_inputs_give_floats():
    R = [[1, 0], [0, 1]]
    s = summarize(R, [0, 0])
    assert s["aa"] == 0.5 and isinstance(s["aa"], float)
    assert s["bwt"] == -1.0 and s["forgetting"] == 1.0 and s["fwt"] == 0.0


def test_missing_cells_give_none_not_a_guess():
    # eval.matrix: diagonal — only R[i][i], R[i][i+1] and the last row evaluated
    R = [
        [80.0, 10.0, None],
        [None, 90.0, 30.0],
        [50.0, 70.0, 95.0],
    ]
    assert average_accuracy(R) == pytest.approx(215 / 3)
    assert backward_transfer(R) == pytest.approx(-25.0)
    assert forward_transfer(R, R0) == pytest.approx(13.0)
    assert forgetting(R) is None  # needs max(R[0][0], R[1][0]); R[1][0] is missing
    s = summarize(R, R0)
    assert s["diagonal"] == [80.0, 90.0, 95.0] and s["final_row"] == [50.0, 70.0, 95.0]
    # an unfinished diagonal run: the live AA needs R[1][0], so it is not measured either
    assert average_accuracy(R[:2]) is None and backward_transfer(R[:2]) is None
