"""The five notebooks: committed clean, and runnable in order, headless, on synthetic data
and on a small folder of pictures as a user brings it; and `make run`'s check of the data.

Each run executes every notebook with papermill in a fresh kernel, as `make run` does.
Checkpoints and logs go to model/<run>.pth and logs/<run>/ under a run name unique to the
test, and are removed afterwards, as is the folder's decoded cache in data/cache/.
"""

import importlib.util
import inspect
import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import nbformat
import pytest
from test_data import write_user_folder
from test_predict import odd_pictures

import model
import utils
from images import image_files

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
# docs/build.py, which makes the executed copies, is a script beside them, not a module.
_spec = importlib.util.spec_from_file_location("build", ROOT / "docs" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)
NOTEBOOKS = build.NOTEBOOKS
SAMPLES = ROOT / "samples"

# Shared by every notebook; papermill ignores (with a warning) the names a notebook lacks.
SMOKE_PARAMETERS = {
    "DATA": "synthetic",
    "EPOCHS": 1,
    "VAL_SIZE": 100,
    "SMALL_INPUT": False,
    "BATCH_SIZE": 64,
    "SEED": 0,
}


def read(name):
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def outputs_text(nb):
    """Everything the executed notebook printed or displayed as text."""
    parts = []
    for cell in code_cells(nb):
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                parts.append(output.text)
            elif output.output_type in ("execute_result", "display_data"):
                parts.append(output.get("data", {}).get("text/plain", ""))
            elif output.output_type == "error":
                parts.append("\n".join(output.traceback))
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------
# The committed notebooks


def test_all_five_notebooks_are_there():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9]*.ipynb")) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_valid_and_has_no_outputs(name):
    nb = read(name)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in code_cells(nb):
        assert cell.outputs == [], f"{name}: a code cell has outputs; strip them before committing"
        assert cell.execution_count is None, f"{name}: a code cell has an execution count"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_exactly_one_parameters_cell_first(name):
    cells = code_cells(read(name))
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: {len(tagged)} cells tagged 'parameters'"
    assert tagged[0] is cells[0], f"{name}: the parameters cell must be the first code cell"
    # Plain literals only, one per line, so that papermill and a reader can override them.
    for line in tagged[0].source.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            target, _, value = line.partition("=")
            assert target.strip().isupper(), f"{name}: parameter line {line!r}"
            compile(value.strip(), name, "eval")
    # The next code cell finds the project root, so that the imports after it work anywhere.
    assert "model.py" in cells[1].source and "sys.path" in cells[1].source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_uses_the_modules_instead_of_redefining_them(name):
    source = "\n".join(cell.source for cell in code_cells(read(name)))
    assert not re.search(r"^\s*(class|def)\s", source, re.MULTILINE), f"{name}: logic belongs in the modules"
    if name != "02_network":
        assert "import utils" in source
    if name in ("02_network", "03_training"):
        assert "from model import" in source
    if name == "05_prediction":
        assert "import predict" in source


def test_docs_build_shows_progress_bars_as_a_terminal_does():
    stream = nbformat.v4.new_output
    cell = nbformat.v4.new_code_cell("train()\n")  # as papermill leaves its parameters cell
    cell.outputs = [
        stream("stream", name="stderr", text=t) for t in ("\rEpoch 1:   0%", "\rEpoch 1:  50%", "\rEpoch 1: 100%", "\n")
    ]
    cell.outputs.append(stream("stream", name="stdout", text=f"saved {ROOT}/model/run.pth\n"))
    cell.metadata["papermill"] = {"duration": 1.0}
    nb = build.tidy(nbformat.v4.new_notebook(cells=[cell], metadata={"papermill": {"input_path": str(ROOT)}}))
    assert [(o.name, o.text) for o in nb.cells[0].outputs] == [
        ("stderr", "Epoch 1: 100%\n"),
        ("stdout", "saved model/run.pth\n"),
    ]
    assert "papermill" not in nb.metadata and "papermill" not in nb.cells[0].metadata
    assert nb.cells[0].source == "train()"  # as ruff format wants it


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_executed_copy_in_docs_is_the_notebook_with_its_outputs(name):
    path = build.DOCS / f"{name}.ipynb"
    copy = nbformat.read(path, as_version=4)
    # papermill adds a cell with the parameters of the run after the tagged one.
    cells = [cell for cell in copy.cells if "injected-parameters" not in cell.metadata.get("tags", [])]
    assert [(cell.cell_type, cell.source) for cell in cells] == [(c.cell_type, c.source) for c in read(name).cells], (
        f"docs/{name}.ipynb is not notebooks/{name}.ipynb as it stands: python docs/build.py --data DATA {name}"
    )
    cells = [cell for cell in cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in cells), f"docs/{name}.ipynb: a cell did not run"
    assert not [o for cell in cells for o in cell.outputs if o.output_type == "error"]
    text = path.read_text(encoding="utf-8")
    assert len(text.encode()) < build.MAX_BYTES
    assert not build.ABSOLUTE_PATH.findall(text)


# ----------------------------------------------------------------------------------------
# Running them


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def image_server():
    """samples/ over HTTP on localhost, so that the URL cell has something to download."""
    address, server = build.serve(SAMPLES)
    yield address
    server.shutdown()
    server.server_close()


def execute(name, output, parameters):
    import papermill

    start = time.perf_counter()
    papermill.execute_notebook(
        str(NOTEBOOK_DIR / f"{name}.ipynb"),
        str(output),
        parameters=parameters,
        cwd=str(NOTEBOOK_DIR),
        kernel_name="python3",
        progress_bar=False,
        execution_timeout=300,
    )
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def executed(tmp_path_factory, image_server):
    """Run the five notebooks in order once; each test below checks one of them.

    Returns {name: (executed notebook, seconds)} or {name: exception}; a notebook after a
    failed one is not run.
    """
    out = tmp_path_factory.mktemp("runs")
    run_name = f"pytest-notebooks-{uuid.uuid4().hex[:8]}"
    parameters = {**SMOKE_PARAMETERS, "RUN_NAME": run_name, "IMAGE_URL": f"{image_server}/ship.png"}
    results = {"run_name": run_name}
    try:
        results.update(run_all(out, parameters))
        # Notebook 5 once more, as a reader who trained nothing and has no network sees it: the
        # shipped weights instead of model/<RUN_NAME>.pth, and an address where nothing answers.
        if isinstance(results.get("05_prediction"), tuple):
            offline = {
                **parameters,
                "RUN_NAME": f"{run_name}-untrained",
                "IMAGE_URL": f"http://127.0.0.1:{free_port()}/cat.jpg",
            }
            try:
                execute("05_prediction", out / "05_prediction_offline.ipynb", offline)
                results["offline"] = nbformat.read(out / "05_prediction_offline.ipynb", as_version=4)
            except Exception as error:
                results["offline"] = error
        yield results
    finally:
        remove_run(run_name)


def remove_run(run_name):
    for path in (utils.MODEL_DIR / f"{run_name}.pth", utils.last_checkpoint_path(utils.MODEL_DIR / f"{run_name}.pth")):
        path.unlink(missing_ok=True)
    shutil.rmtree(utils.LOG_DIR / run_name, ignore_errors=True)


def run_all(out, parameters):
    """Execute the five notebooks in order: {name: (executed notebook, seconds) or exception};
    a notebook after a failed one is not run."""
    results = {}
    for name in NOTEBOOKS:
        try:
            seconds = execute(name, out / f"{name}.ipynb", parameters)
        except Exception as error:
            results[name] = error
            break
        results[name] = (nbformat.read(out / f"{name}.ipynb", as_version=4), seconds)
        print(f"{name}: {seconds:.1f} s")
    return results


def ran(executed, name):
    result = executed.get(name)
    if result is None:
        pytest.fail(f"{name} did not run: an earlier notebook failed")
    if isinstance(result, Exception):
        pytest.fail(f"{name} failed:\n{result}")
    return result[0]


@pytest.mark.slow
def test_01_data_runs(executed):
    text = outputs_text(ran(executed, "01_data"))
    assert "training: 900 images, validation: 100, test: 200" in text
    assert "mean per channel" in text


@pytest.mark.slow
def test_02_network_runs(executed):
    text = outputs_text(ran(executed, "02_network"))
    assert "Total params: 2,236,682" in text
    assert "12.32" in text
    assert "torch.Size([2, 10])" in text
    assert "final feature map 1x1" in text and "final feature map 4x4" in text
    # The network's code is shown from model.py itself, so it cannot differ from what runs.
    for code in (model._make_divisible, model.ConvBNReLU, model.InvertedResidual, model.MobileNetV2):
        assert inspect.getsource(code) in text, code.__name__
    assert "by hand: 3744 + 1584 + 3504 = 8832; the module has 8832" in text


@pytest.mark.slow
def test_03_training_runs_and_saves(executed):
    text = outputs_text(ran(executed, "03_training"))
    run = executed["run_name"]
    assert "Epoch [  1/  1]" in text
    assert f"best checkpoint: model/{executed['run_name']}.pth" in text  # relative to the project
    best = utils.MODEL_DIR / f"{run}.pth"
    assert best.is_file() and utils.last_checkpoint_path(best).is_file()
    net, checkpoint = utils.load_model(best, device="cpu")
    assert checkpoint["classes"] == [f"class_{i}" for i in range(10)]
    assert net.config["small_input"] is False
    log_dir = utils.LOG_DIR / run
    assert list(log_dir.glob("events.out.tfevents.*")), "no TensorBoard event file"
    for png in ("loss.png", "accuracy.png", "lr.png"):
        assert (log_dir / png).stat().st_size > 0


@pytest.mark.slow
def test_04_testing_runs_and_saves_figures(executed):
    text = outputs_text(ran(executed, "04_testing"))
    by_hand = re.search(r"Accuracy of the network on the 200 test images: (\d+\.\d\d) %", text)
    assert by_hand and f"utils.evaluate: {by_hand.group(1)} %" in text  # the loop by hand, then the helper
    assert "Accuracy of class_0 :" in text
    assert re.search(r"with flip TTA \(2 views\): +\d+\.\d\d %", text)
    assert re.search(r"with flip-translate TTA \(6 views\): +\d+\.\d\d %", text)
    log_dir = utils.LOG_DIR / executed["run_name"]
    for png in ("per_class_accuracy.png", "confusion_matrix.png", "test_predictions.png"):
        assert (log_dir / png).stat().st_size > 0
    assert (log_dir / "confident_mistakes.png").is_file() or "No mistakes" in text


@pytest.mark.slow
def test_05_prediction_runs(executed):
    text = outputs_text(ran(executed, "05_prediction"))
    assert "Refused:" in text  # the whole pickled model is not loaded
    # The preprocessing by hand ran (its cell asserts that it agrees with predict.predict).
    assert any("softmax" in cell.source and cell.outputs for cell in code_cells(ran(executed, "05_prediction")))
    assert "No prediction for the web picture" not in text  # the local server answered the URL cell
    for sample in SAMPLES.iterdir():
        assert sample.name in text  # the folder's predictions


@pytest.mark.slow
def test_05_prediction_url_cell_fails_politely_offline(executed):
    ran(executed, "05_prediction")
    result = executed.get("offline")
    if isinstance(result, Exception):
        pytest.fail(f"the prediction notebook stopped on an unreachable URL:\n{result}")
    text = outputs_text(result)
    assert "No prediction for the web picture" in text and "http://127.0.0.1:" in text
    assert "yet (notebook 3 trains it): using the weights that ship with the project." in text
    for sample in SAMPLES.iterdir():
        assert re.search(rf"{sample.name} +{sample.stem} ", text), f"the shipped weights misread {sample.name}"


# ----------------------------------------------------------------------------------------
# A user's own folder, with the default parameters


@pytest.fixture(scope="module")
def user_run(tmp_path_factory, image_server):
    """The five notebooks on a small folder with what users' folders hold (classes of very
    different sizes, sub-folders, suffixes in any case, grayscale, non-square, transparent,
    16-bit, CMYK and EXIF-rotated pictures, hidden and other files), with every parameter at
    its default except EPOCHS, the folders, the run name and the web picture's address."""
    name = f"pytest-photos-{uuid.uuid4().hex[:8]}"
    folder = write_user_folder(tmp_path_factory.mktemp("user") / name, train_counts=(190, 80, 25), test_count=5)
    odd_pictures(folder / "train" / "kind1" / "odd")
    odd_pictures(folder / "test" / "kind0" / "odd")
    parameters = {
        "DATA": str(folder),
        "EPOCHS": 1,
        "RUN_NAME": name,
        "FOLDER": str(folder / "test"),
        "IMAGE_URL": f"{image_server}/ship.png",
    }
    results = {"folder": folder}
    try:
        with pytest.MonkeyPatch.context() as env:
            env.delenv("JPY_SESSION_NAME", raising=False)  # as from a terminal, even if started in JupyterLab
            results.update(run_all(tmp_path_factory.mktemp("user-runs"), parameters))
        yield results
    finally:
        remove_run(name)
        for cached in (utils.DATA_DIR / "cache").glob(f"{name}-*.pt"):
            cached.unlink()


@pytest.mark.slow
def test_user_folder_01_splits_ten_percent_and_shows_text_progress(user_run):
    nb = ran(user_run, "01_data")
    text = outputs_text(nb)
    # 302 training pictures: 10 % by class size, 190 : 87 : 25.
    assert "training: 272 images, validation: 30, test: 22" in text
    assert "validation images per class: [19, 9, 2]" in text
    name = user_run["folder"].name
    assert re.search(rf"Decoding {name}/train: 100%\|.*\| 302/302 \[.*it/s\]", text)  # text, rate included
    outputs = [output for cell in code_cells(nb) for output in cell.outputs]
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]


@pytest.mark.slow
def test_user_folder_trains_tests_and_predicts(user_run):
    training = ran(user_run, "03_training")
    assert "Epoch [  1/  1]" in outputs_text(training)
    # The training bars are text under papermill too, with their rate and time left.
    assert re.search(r"Train Epoch 1/1: 100%\|.*\| \d+/\d+ \[.*(it/s|s/it)", outputs_text(training))
    outputs = [output for cell in code_cells(training) for output in cell.outputs]
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert "Accuracy of the network on the 22 test images:" in outputs_text(ran(user_run, "04_testing"))
    table = outputs_text(ran(user_run, "05_prediction"))
    test_dir = user_run["folder"] / "test"
    pictures = image_files(test_dir)
    assert len(pictures) == 22
    for picture in pictures:
        assert re.search(re.escape(picture.relative_to(test_dir).as_posix()) + r"\s+kind\d", table), picture
    assert "._000.jpg" not in table and "notes.txt" not in table and "error:" not in table


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_reports_a_data_problem_in_one_line_before_any_notebook(tmp_path):
    missing = tmp_path / "nowhere"
    # -o setup: the environment is there already; only the run target is under test.
    done = subprocess.run(
        ["make", "-o", "setup", "run", f"DATA={missing}"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert done.stderr.splitlines()[0] == f"error: Data folder {missing} does not exist."
    assert "==" not in done.stdout and "Traceback" not in done.stderr
