"""Every known bad input (tools/bad_inputs.py, which also writes docs/bad-inputs.md) ends with exit code 2
and one line that names the key or file, in this process: nothing is accepted silently, nothing prints a
traceback."""
import pytest

from tools.bad_inputs import CASES, Work, run_case


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return Work(tmp_path_factory.mktemp("bad-inputs"), in_process=True)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_exit_code_2(case, work, tmp_path):
    work.path = tmp_path      # each case its own scratch folder; the teacher run is shared
    command, code, line, fragment = run_case(case, work)
    assert code == 2, f"{command}: exit code {code}, last line {line!r}"
    assert line.startswith("error: ") and fragment in line, line
    assert "Traceback" not in line
