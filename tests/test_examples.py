"""The README's quick start runs as written (examples/quickstart.py, the same lines)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_matches_the_readme():
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("quickstart ok: P2 loss ")
    code = (ROOT / "examples" / "quickstart.py").read_text()
    snippet = code.split("# --- README quick start ---\n")[1].split("# --- end ---")[0].strip()
    readme = (ROOT / "README.md").read_text()
    assert snippet in readme, "README's quick start and examples/quickstart.py differ"
