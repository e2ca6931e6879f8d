"""Executed copies of the five notebooks, to read with their outputs without running anything.

    make docs                               (python docs/build.py; DATA=... as for make run)
    python docs/build.py 05_prediction      only the notebooks named (after editing one of them)

Each notebook of notebooks/ runs once with papermill, in order, on the real data and on this
machine, as a reader runs it: notebook 3 trains the default run (10 epochs) under the run name
"docs"; notebooks 4 and 5 find no model/mobilenetv2.pth and test and predict with the weights
that ship with the project (model/pretrained/), as they say in their first output. The URL
example of notebook 5 downloads a picture of samples/ from a server on this machine, so that
the build needs no internet. Progress bars are kept as a terminal shows them in the end, and
each copy is checked to stay under 2 MB. tests/test_notebooks.py checks that the copies' code
is the notebooks' code.
"""

import argparse
import functools
import http.server
import re
import sys
import threading
import time
from pathlib import Path

import nbformat
import papermill

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import images  # noqa: E402
from runtime import MODEL_DIR  # noqa: E402

DOCS = ROOT / "docs"
NOTEBOOKS = ["01_data", "02_network", "03_training", "04_testing", "05_prediction"]
MAX_BYTES = 2_000_000
TRAINING_RUN = "docs"
ABSOLUTE_PATH = re.compile(r"(?:/home|/root|/tmp|/work|/Users|/var)/[^\s\"']*")


def serve(folder):
    """``folder`` over HTTP on a free local port, in a daemon thread: (its address, the server
    to shut down)."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def as_a_terminal_shows_it(text):
    """Each line as it reads once a progress bar has finished redrawing it: the text after
    its last carriage return."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def tidy(nb):
    """The executed notebook as a reader should see it: each run of writes to one stream in
    one output, progress bars as a terminal shows them in the end, paths relative to the
    project, and no run record (papermill's holds the paths of the machine that ran it)."""
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        cell.source = cell.source.rstrip()  # papermill's parameters cell ends in a blank line
        outputs = []
        for output in cell.outputs:
            last = outputs[-1] if outputs else None
            if output.output_type == "stream" and last and last.output_type == "stream" and last.name == output.name:
                last.text += output.text
            else:
                outputs.append(output)
        for output in outputs:
            if output.output_type == "stream":
                output.text = as_a_terminal_shows_it(output.text).replace(f"{ROOT}/", "")
        cell.outputs = outputs
    return nb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="cifar10", help="the data set the notebooks use (their DATA)")
    parser.add_argument("names", nargs="*", help="the notebooks to run, e.g. 05_prediction (default: all five)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(NOTEBOOKS))
    if unknown:
        sys.exit(f"No notebook {unknown} in notebooks/; choose from {NOTEBOOKS}.")
    problem = images.data_source_problem(args.data)
    if problem:
        sys.exit(problem)
    if (MODEL_DIR / "mobilenetv2.pth").exists():
        sys.exit("model/mobilenetv2.pth exists, so notebooks 4 and 5 would use it instead of the shipped weights: "
                 "move it aside and build again.")  # fmt: skip

    address, _ = serve(ROOT / "samples")
    parameters = {
        "01_data": {"DATA": args.data},
        "02_network": {},
        "03_training": {"DATA": args.data, "RUN_NAME": TRAINING_RUN},
        "04_testing": {"DATA": args.data},
        "05_prediction": {"IMAGE_URL": f"{address}/ship.png"},
    }
    for name in args.names or NOTEBOOKS:
        values = parameters[name]
        out = DOCS / f"{name}.ipynb"
        start = time.perf_counter()
        papermill.execute_notebook(ROOT / "notebooks" / f"{name}.ipynb", out, parameters=values,
                                   cwd=ROOT / "notebooks", kernel_name="python3", progress_bar=False)  # fmt: skip
        nbformat.write(tidy(nbformat.read(out, as_version=4)), out)
        text = out.read_text(encoding="utf-8")
        size = len(text.encode())
        print(f"{out.relative_to(ROOT)}: {time.perf_counter() - start:.0f} s, {size / 1e6:.2f} MB")
        if size > MAX_BYTES:
            sys.exit(
                f"{out.relative_to(ROOT)} is {size / 1e6:.2f} MB, more than {MAX_BYTES / 1e6:.0f} MB: shrink its figures."
            )
        # Outputs are read by anyone: no folder of the machine that made them.
        found = sorted(set(ABSOLUTE_PATH.findall(text)))
        if found:
            sys.exit(f"{out.relative_to(ROOT)} shows absolute paths {found}: make the notebook print relative ones.")


if __name__ == "__main__":
    main()
