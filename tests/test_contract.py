"""The workflow's contract, unit by unit (fast, CPU): atomic writes, checked readers, specs from files, the
CPU-measurement lock, host load and flags, config files and --config strings, signal-killed jobs, the stack
plot's subtitle. The defects of issue 11 are named where each is covered; tests/test_workflow_contract.py
checks the same through snakemake.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from e1.configfile import coerce_strings, load_config_file
from e1.jobs import hostload
from e1.jobs.io import ArtifactError, Record, atomic_path, write_json
from e1.jobs.spec import MeasureJob, load
from e1.latency.table import CV_LIMIT, flags, read_latency, read_summary, stage_latency
from fakes import measure_summary, write

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
E1_JOB = REPO / "workflow" / "scripts" / "e1-job"


def e1(*args: str, env: dict | None = None, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "e1", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}, preexec_fn=preexec)


# --- defect 3: readers validate their inputs and name the file, the key, the value, the remedy -----------

def test_truncated_summary_names_the_file_and_the_rule(tmp_path):
    good = write(tmp_path / "a.json", measure_summary("a"))
    cut = tmp_path / "b.json"
    cut.write_text(good.read_text()[:300])
    p = e1("stage-latency", "--out", str(tmp_path / "t.json"), str(good), str(cut))
    assert p.returncode == 2
    assert f"{cut}: not valid JSON (" in p.stderr and "line 1 column" in p.stderr, p.stderr
    assert f"delete {cut} and run snakemake again to rebuild it (rule measure)" in p.stderr
    assert "snakemake --forcerun measure" in p.stderr
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("value, problem", [(float("nan"), "holds NaN"), (-1.5, "is -1.5, expected a number >= 0")])
def test_bad_median_is_refused_naming_the_key(tmp_path, value, problem):
    s = measure_summary("a")
    s["stages"]["prefill"]["median_ms"] = value
    path = tmp_path / "a.json"
    path.write_text(json.dumps(s))  # json writes NaN as NaN, as the defect report found in the wild
    with pytest.raises(ArtifactError) as e:
        stage_latency([path], tmp_path / "t.json")
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and problem in msg, msg
    if not math.isnan(value):
        assert "stages.prefill.median_ms" in msg
    assert not (tmp_path / "t.json").exists()


def test_empty_configs_list_is_named(tmp_path):
    table = stage_latency([write(tmp_path / "a.json", measure_summary("a"))], tmp_path / "t.json")
    table["configs"] = []
    path = write(tmp_path / "empty.json", table)
    p = e1("plot-stack", "--latency", str(path), "--out", str(tmp_path / "x.png"))
    assert p.returncode == 2
    assert f"{path}: configs is an empty list: nothing to work with" in p.stderr, p.stderr
    assert "rule stage_latency" in p.stderr and not (tmp_path / "x.png").exists()


def test_missing_key_and_wrong_type_are_named(tmp_path):
    s = measure_summary("a")
    del s["counts"]["prefill_tokens"]
    with pytest.raises(ArtifactError, match=r"counts\.prefill_tokens is missing"):
        read_summary(write(tmp_path / "a.json", s))
    s = measure_summary("a")
    s["decode_step"]["median_ms"] = "fast"
    with pytest.raises(ArtifactError, match=r"decode_step\.median_ms is 'fast', expected a finite number"):
        read_summary(write(tmp_path / "b.json", s))
    with pytest.raises(ArtifactError, match="no such file .rule measure makes it"):
        read_summary(tmp_path / "none.json")
    (tmp_path / "zero.json").write_text("")
    with pytest.raises(ArtifactError, match="empty file"):
        read_summary(tmp_path / "zero.json")


def test_record_access():
    r = Record({"a": {"b": [1, 2.5]}, "t": True}, "f.json", "rule_x")
    assert r["a"]["b"].number(1) == 2.5
    with pytest.raises(ArtifactError, match=r"f.json: a\.b\.2 is missing"):
        r["a"]["b"][2]
    with pytest.raises(ArtifactError, match="t is True, expected a finite number"):
        r.number("t")


# --- defect 4: every write is atomic ------------------------------------------------------------------

def _limit_file_size(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_write_that_runs_out_of_space_leaves_nothing(tmp_path):
    paths = [write(tmp_path / f"{c}.json", measure_summary(c)) for c in "abc"]
    out = tmp_path / "out" / "t.json"
    p = e1("stage-latency", "--out", str(out), *map(str, paths), preexec=_limit_file_size(4096))
    assert p.returncode != 0 and "File too large" in p.stderr, p.stderr
    assert not out.exists()  # before: a truncated table was left behind
    assert list(out.parent.iterdir()) == []  # and no temporary file either


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "x.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["x.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def test_write_json_refuses_nan_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"stages\.e2e\.median_ms is not a finite number"):
        write_json(tmp_path / "x.json", {"stages": {"e2e": {"median_ms": float("nan")}}})
    assert not (tmp_path / "x.json").exists()


# --- defect 5: specs travel in files -------------------------------------------------------------------

def test_spec_files_are_checked(tmp_path):
    spec = {"id": "x", "model": "molmoe-1b-tiny", "device": "cpu", "dtype": "float32", "weights": "random", "seed": 0,
            "variant": "v", "knobs": {}, "image": "336x336", "image_path": "i.png", "prompt": "short",
            "prompt_path": "p.json", "decode_tokens": 2, "warmup": 3, "timed": 10,
            "energy": {"repeats": 3, "min_periods": 10}}
    assert load(write(tmp_path / "ok.json", spec), MeasureJob).decode_tokens == 2
    with pytest.raises(ArtifactError, match=r"missing keys \['timed'\], unknown keys \['timd'\]"):
        load(write(tmp_path / "bad.json", {**{k: v for k, v in spec.items() if k != "timed"}, "timd": 1}), MeasureJob)
    with pytest.raises(ArtifactError, match="decode_tokens is '2', expected int"):
        load(write(tmp_path / "type.json", {**spec, "decode_tokens": "2"}), MeasureJob)


# --- defect 6: clear errors -----------------------------------------------------------------------------

def _tokenizer_dir(path, specials: dict[str, int]):
    """A real tokenizer.json (tokenizers' WordLevel model over words and punctuation) with `specials`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "User", ":", "Assistant", "What", "color", "is", "the", "car", "?"]
    vocab = {w: i + 2 for i, w in enumerate(words)} | specials
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    return path


MOLMO_SPECIALS = {"<|endoftext|>": 50279, "<im_start>": 50280, "<im_end>": 50281, "<im_patch>": 50282,
                  "<im_col>": 50283, "<|image|>": 50284}


def test_prompt_tokenized_for_real(tmp_path):
    from e1.inputs.prompts import make_prompt
    from e1.model.arch import load_arch

    tok = _tokenizer_dir(tmp_path / "tok", MOLMO_SPECIALS)
    rec = make_prompt(load_arch("molmoe-1b-tiny"), "short", 16, "What color is the car ?", str(tok))
    assert rec["prompt_tokens"] == 6  # counted from the text, not the configured 16
    assert rec["text_ids"] == [3, 4, 6, 7, 8, 9, 10, 11, 5, 4]  # User : What color is the car ? Assistant :
    assert rec["source"] == f"tokenizer {tok / 'tokenizer.json'}"


def test_tokenizer_with_other_special_ids_is_refused(tmp_path):
    from e1.inputs.prompts import make_prompt
    from e1.model.arch import load_arch

    specials = {k: v for k, v in MOLMO_SPECIALS.items() if k != "<im_col>"} | {"<im_patch>": 100280}
    tok = _tokenizer_dir(tmp_path / "tok", specials)
    with pytest.raises(ValueError) as e:
        make_prompt(load_arch("molmoe-1b-tiny"), "short", 16, "What", str(tok))
    assert "<im_patch> is 100280 (model: 50282)" in str(e.value) and "<im_col> is None (model: 50283)" in str(e.value)


def test_broken_tokenizer_json_is_named(tmp_path):
    from e1.inputs.prompts import make_prompt
    from e1.model.arch import load_arch

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{ broken")
    with pytest.raises(ValueError, match="tokenizer '.*tokenizer.json' cannot be read"):
        make_prompt(load_arch("molmoe-1b-tiny"), "short", 16, "What", str(tmp_path / "tok"))


def test_tokenizer_auto_takes_the_weights_folder(tmp_path):
    from e1.inputs.prompts import resolve_tokenizer

    assert resolve_tokenizer("auto", "random") is None
    assert resolve_tokenizer("auto", str(tmp_path)) is None  # a weights folder without tokenizer.json
    (tmp_path / "tokenizer.json").write_text("{}")
    assert resolve_tokenizer("auto", str(tmp_path)) == str(tmp_path)
    assert resolve_tokenizer(None, str(tmp_path)) is None and resolve_tokenizer("/t", "random") == "/t"


def test_missing_or_empty_tokenizer_directory_is_named(tmp_path):
    from e1.inputs.prompts import make_prompt
    from e1.model.arch import load_arch

    arch = load_arch("molmoe-1b-tiny")
    with pytest.raises(ValueError, match="tokenizer '/nowhere/tok': no such directory"):
        make_prompt(arch, "short", 16, "hi", "/nowhere/tok")
    with pytest.raises(ValueError, match="the directory has no tokenizer.json"):
        make_prompt(arch, "short", 16, "hi", str(tmp_path))


@pytest.mark.parametrize("content, message", [
    (b"model: auto\nseed: \xff\xfe\n", "not UTF-8 text: byte 0xff at line 2, column 7"),
    (b"model: auto\nimages: [336x336\nseed: 0\n", "not valid YAML at line 3, column 5"),
])
def test_config_file_faults_name_file_line_and_column(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        load_config_file(path)
    assert str(e.value).startswith(f"config file {path}: ") and message in str(e.value), e.value
    p = e1("check-config", str(path))
    assert p.returncode == 2 and message in p.stderr


def test_a_job_killed_by_a_signal_says_so(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'loading the model' >&2\nkill -9 $$\n")
    fake_python.chmod(0o755)
    log = tmp_path / "job.log"
    p = subprocess.run(["bash", str(E1_JOB), str(fake_python), str(REPO / "src"), str(log), "measure", "--spec", "x"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 137
    expected = "e1 measure: killed by signal 9 (SIGKILL): most likely the out-of-memory killer"
    assert expected in p.stderr and expected in log.read_text() and "loading the model" in log.read_text()


# --- defect 1: a job runs the package of its own checkout ---------------------------------------------

def test_main_refuses_an_e1_from_another_checkout(tmp_path):
    p = e1("describe", "--image", "336x336", env={"E1_SRC": str(tmp_path)})
    assert p.returncode == 2 and f"this job must run the package of {tmp_path}" in p.stderr, p.stderr
    assert e1("describe", "--image", "336x336", env={"E1_SRC": str(REPO / "src")}).returncode == 0


# --- defect 7: CPU measurements never overlap; host load is recorded and flagged --------------------------

HOLD_CPU = """
import sys, time
from e1.jobs import claims
claims.claim_cpu()
print(time.time(), flush=True)
time.sleep(float(sys.argv[1]))
"""


def test_cpu_measurements_wait_for_each_other(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "E1_CPU_LOCK_DIR": str(tmp_path)}
    first = subprocess.Popen([sys.executable, "-c", HOLD_CPU, "2"], env=env, stdout=subprocess.PIPE, text=True)
    t_first = float(first.stdout.readline())
    second = subprocess.run([sys.executable, "-c", HOLD_CPU, "0"], env=env, capture_output=True, text=True,
                            timeout=60)
    first.wait(timeout=60)
    assert float(second.stdout) >= t_first + 1.9  # it claimed only after the first released the lock
    assert "another CPU measurement holds" in second.stderr and f"pid {first.pid}" in second.stderr


def test_host_load_snapshot_sees_a_busy_process():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        snap = hostload.snapshot(window_s=0.3)
    finally:
        busy.kill()
    assert busy.pid in [p["pid"] for p in snap["busy_processes"]], snap
    assert f"pid {busy.pid}" in hostload.loaded(snap) and len(snap["loadavg"]) == 3


def test_flags_name_noisy_stages_and_a_loaded_host(tmp_path):
    quiet = measure_summary("quiet")
    noisy = measure_summary("noisy")
    noisy["stages"]["decode"]["cv"] = 0.3
    busy = {"loadavg": [2.0, 1.0, 0.5], "busy_processes": [{"pid": 7, "name": "stress", "cpu_share": 0.98}]}
    noisy["meta"]["host_load"] = {"before_timed_runs": busy, "after_timed_runs": {"busy_processes": []}}
    assert flags(quiet) == []
    assert flags(noisy) == [f"decode CV 0.30 > {CV_LIMIT}",
                            "host busy before timed runs: other processes used the CPU: pid 7 (stress) 98 % of a core"]
    table = stage_latency([write(tmp_path / "q.json", quiet), write(tmp_path / "n.json", noisy)], tmp_path / "t.json")
    assert table["meta"]["flagged"] == {"noisy": flags(noisy)} and "coefficient of variation" in table["meta"]["flag_rule"]
    assert read_latency(tmp_path / "t.json")["configs"][1]["flags"] == flags(noisy)


# --- defect 8: --config strings --------------------------------------------------------------------------

def test_cli_strings_become_the_numbers_the_schema_asks_for():
    cfg = {"decode_tokens": ["16", "64"], "moe_top_k": ["1", "8"], "max_crops": "null", "seed": "3",
           "images": ["336x336"], "prompts": {"a": {"tokens": "5", "text": "12"}}, "select_prompts": ["a"]}
    assert coerce_strings(cfg, SCHEMA) == {"decode_tokens": [16, 64], "moe_top_k": [1, 8], "max_crops": None,
                                           "seed": 3, "images": ["336x336"],
                                           "prompts": {"a": {"tokens": 5, "text": "12"}}, "select_prompts": ["a"]}


# --- defect 9: the stack plot's subtitle stays inside the figure ------------------------------------------

def test_stack_plot_text_fits_the_figure(tmp_path):
    from e1.plots.stack import stack_figure

    rows = [measure_summary(f"c{i}") for i in range(3)]
    for i, r in enumerate(rows):
        r["id"], r["decode_tokens"] = f"336x336__short__n{2 + i}__v", 2 + i
    table = stage_latency([write(tmp_path / f"{r['id']}.json", r) for r in rows], tmp_path / "t.json")
    fig = stack_figure(table)
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width = fig.get_figwidth() * fig.dpi
    texts = [fig._suptitle, *(ax.title for ax in fig.axes)]
    for t in texts:
        box = t.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= width, (t.get_text()[:80], box.x0, box.x1, width)
    assert "after 3 warm-up" in " ".join(fig.axes[0].title.get_text().split())


PARENT_SPINS = """
import json, subprocess, sys, threading
stop = False
def spin():
    while not stop:
        pass
threading.Thread(target=spin, daemon=True).start()
child = "from e1.jobs import hostload; import json; print(json.dumps(hostload.snapshot(0.3)))"
out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout
stop = True
print(out)
"""


def test_the_workflow_running_a_job_is_not_a_busy_neighbour():
    """The job's own ancestors (its shell, snakemake polling at 30-45 % of a core on the H200) are reported
    apart, not as another process loading the host."""
    p = subprocess.run([sys.executable, "-c", PARENT_SPINS], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    snap = json.loads(p.stdout)
    parent = [w for w in snap["workflow_processes"] if w["cpu_share"] > 0.5]
    assert parent and all(b["pid"] != parent[0]["pid"] for b in snap["busy_processes"]), snap
