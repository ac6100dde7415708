"""The code fingerprint: what says two runs ran the same package code."""

from migu.provenance import code_fingerprint, provenance


def _tree(tmp_path, files):
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_fingerprint_moves_with_the_python_sources_that_run(tmp_path):
    root = _tree(tmp_path / "a", {"core.py": "x = 1\n", "report/plots.py": "y = 2\n", "README.md": "doc"})
    before = code_fingerprint(root)
    assert len(before) == 12 and int(before, 16) >= 0
    (root / "README.md").write_text("other doc")  # not code: same fingerprint
    (root / "cache.pyc").write_bytes(b"\0")
    assert code_fingerprint(root) == before
    (root / "report/plots.py").write_text("y = 3\n")  # reports only read run directories
    assert code_fingerprint(root) == before
    (root / "core.py").write_text("x = 2\n")
    assert code_fingerprint(root) != before


def test_fingerprint_names_files_not_only_bytes(tmp_path):
    # the same bytes under another name (a moved module) is other code
    one = _tree(tmp_path / "one", {"a.py": "x = 1\n"})
    two = _tree(tmp_path / "two", {"b.py": "x = 1\n"})
    assert code_fingerprint(one) != code_fingerprint(two)


def test_provenance_records_this_package():
    assert provenance()["code"] == code_fingerprint()
