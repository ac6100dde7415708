"""The prompt format of the CL_Benchmark (the one the O-LoRA and MIGU papers report numbers with).

    Task:<category>\\nDataset:<task>\\n<instruction>Option: <label1>, <label2> \\n<sentence>\\nAnswer:

The target is the label string; `migu.data.collate.encode` puts a space between "Answer:" and it.
Both the benchmark reader and the custom-stream reader build prompts here, so a custom task is
formatted exactly like a published one.
"""

from __future__ import annotations

from collections.abc import Sequence

# Every prompt ends with this; `encode` keeps it when it has to shorten a prompt.
ANSWER_SUFFIX = "\nAnswer:"


def build_prompt(
    sentence: str,
    task: str,
    category: str | None = None,
    instruction: str | None = None,
    options: Sequence[str] | None = None,
) -> str:
    """Builds the prompt for one record.

    Args:
        sentence: the record's text (already holds "sentence 1: ...", "Title: ..." etc.).
        task: the dataset name, e.g. "agnews".
        category: the task family, e.g. "TC"; defaults to `task`.
        instruction: the category's instruction sentence; None or "" leaves the line out (COPA).
            A missing final newline is added so the option line starts on its own line; the
            published instructions already end with one, so their prompts are unchanged.
        options: the label strings listed after "Option: "; None or empty leaves the line out
            (COPA, whose sentences already say "Choose one between A and B").

    Returns:
        The prompt string, ending with "\\nAnswer:".

    Examples:
        >>> build_prompt("Hi", "SST-2", "SC", "Sentiment?\\n", ["Good", "Bad"])
        'Task:SC\\nDataset:SST-2\\nSentiment?\\nOption: Good, Bad \\nHi\\nAnswer:'
        >>> build_prompt("Which?", "COPA", "COPA")
        'Task:COPA\\nDataset:COPA\\nWhich?\\nAnswer:'
    """
    parts = ["Task:", category or task, "\nDataset:", task, "\n"]
    if instruction:
        parts.append(instruction if instruction.endswith("\n") else instruction + "\n")
    if options:
        # The trailing space before the newline is in the published format; keep it byte-exact.
        parts.append("Option: " + ", ".join(options) + " \n")
    parts += [sentence, ANSWER_SUFFIX]
    return "".join(parts)


def extract_answer(generated: str) -> str:
    """The generated text up to the first newline (the answer line the prompt format asks for)."""
    return generated.split("\n", 1)[0]
