"""Bad input, as a user gives it: each is one `error:` line, exit status 2, no traceback, and
nothing left on disk. One table, run in-process through `llmc.cli.main.main` (the entry
point itself, so its error handling is what is tested); the few cases that need a real
process (a non-UTF-8 argv, a real SIGINT) run as one.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llmc.cli.main import main

LIMITS = ["--max-batch-size", "2", "--max-num-tokens", "16", "--max-seq-len", "32",
          "--kv-block-size", "8"]


def llmc(capsys, *args) -> tuple[int, str, str]:
    """Run the `llmc` entry point in-process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def files_under(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory):
    from llmc.build import BuildOptions, build
    from llmc.limits import BuildLimits

    out = tmp_path_factory.mktemp("errors") / "tiny.engine"
    build(BuildOptions(tiny_models["llama-gqa"][0], out, backend="reference", dtype="fp32",
                       limits=BuildLimits(2, 16, 32, 8)), log=lambda _: None)
    return out


# ------------------------------------------------------------------ checkpoint damage

def st_file(path: Path, header: dict, data: bytes = b"") -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def edit_config(**changes):
    def damage(m: Path):
        cfg = json.loads((m / "config.json").read_text())
        cfg.update(changes)
        (m / "config.json").write_text(json.dumps(cfg))
    return damage


def edit_tensors(edit):
    """Rewrite model.safetensors with `edit(tensors)` applied (a dict name -> array)."""
    def damage(m: Path):
        from safetensors.numpy import load_file, save_file

        tensors = load_file(m / "model.safetensors")
        edit(tensors)
        save_file(tensors, m / "model.safetensors")
    return damage


def write(name: str, data: bytes | str):
    def damage(m: Path):
        (m / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return damage


def remove(*names: str):
    def damage(m: Path):
        for name in names:
            (m / name).unlink()
    return damage


def past_the_end(m: Path) -> None:
    """A well-formed header whose last tensor lies past the end of the (truncated) file."""
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def gguf_header(version: int = 3, n_tensors: int = 0, n_kv: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


BAD_CHECKPOINTS = {   # case -> (damage to a copy of the tiny llama, message)
    "empty safetensors": (write("model.safetensors", b""), "only 0 bytes"),
    "5-byte safetensors": (write("model.safetensors", b"\x05\0\0\0\0"), "only 5 bytes"),
    "random safetensors": (write("model.safetensors", b"\xff" * 64), "header claims"),
    "safetensors header a list": (write("model.safetensors", b"\x02\0\0\0\0\0\0\0[]"),
                                  "not a JSON object"),
    "safetensors header not JSON": (write("model.safetensors", b"\x04\0\0\0\0\0\0\0{{{{"),
                                    "bad header"),
    "safetensors entry malformed": (
        lambda m: st_file(m / "model.safetensors", {"w": {"shape": [2]}}), "malformed entry"),
    "safetensors dtype unknown": (
        lambda m: st_file(m / "model.safetensors",
                          {"w": {"dtype": "I8", "shape": [2], "data_offsets": [0, 2]}}, b"ab"),
        "dtype I8, which llmc cannot read"),
    "safetensors bytes vs shape": (
        lambda m: st_file(m / "model.safetensors",
                          {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
                          b"abcd"), "4 bytes for shape [2]"),
    "safetensors truncated data": (past_the_end, "is truncated: tensor"),
    "tensor of the wrong shape": (edit_tensors(lambda t: t.update(
        {"model.layers.0.self_attn.q_proj.weight": np.zeros((64, 32), np.float32)})),
        "does not fit the model's config"),
    "tensor missing": (edit_tensors(lambda t: t.pop("model.norm.weight")), "model.norm.weight"),
    "only .bin weights": (lambda m: (m / "model.safetensors").rename(m / "model.bin"),
                          "re-save them as safetensors"),
    "corrupt tokenizer.json": (write("tokenizer.json", "{not json"),
                               "tokenizer cannot be loaded"),
    "tokenizer larger than the model": (edit_config(vocab_size=64),
                                        "tokenizer has 128 tokens but the model only 64"),
    "no tokenizer": (remove("tokenizer.json", "tokenizer_config.json"), "has no tokenizer"),
    "corrupt index": (write("model.safetensors.index.json", "{"), "is not valid JSON"),
    "index without weight_map": (write("model.safetensors.index.json", "{}"),
                                 "has no 'weight_map'"),
    "index names a missing shard": (
        write("model.safetensors.index.json", json.dumps({"weight_map": {"a": "x.safetensors"}})),
        "shard x.safetensors named in the index is missing"),
    "config.json not JSON": (write("config.json", "{"), "is not valid JSON"),
    "config.json a list": (write("config.json", "[]"), "should hold a JSON object"),
    "no config.json": (remove("config.json"), "has no config.json"),
    "hidden_size a string": (edit_config(hidden_size="64"), "hidden_size should be an integer"),
    "negative layers": (edit_config(num_hidden_layers=-2), "should not be negative"),
    "architectures a string": (edit_config(architectures="LlamaForCausalLM"),
                               "should be a list"),
    "unsupported architecture": (edit_config(architectures=["BloomForCausalLM"]),
                                 "unsupported architecture 'BloomForCausalLM'"),
    "hidden_act gelu": (edit_config(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    "heads not a multiple": (edit_config(num_key_value_heads=3), "is not a multiple of"),
}


@pytest.mark.parametrize("damage, message", BAD_CHECKPOINTS.values(), ids=BAD_CHECKPOINTS)
def test_a_bad_checkpoint_is_one_clear_error(capsys, tiny_models, tmp_path, damage, message):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama-gqa"][0], model)
    damage(model)
    before = files_under(tmp_path)
    code, out, err = llmc(capsys, "build", "--model", model, "-o", tmp_path / "x.engine",
                          "--backend", "reference", *LIMITS)
    assert_one_error(code, err, message)
    assert files_under(tmp_path) == before   # no engine, no temporary file or folder


def assert_one_error(code: int, err: str, message: str, status: int = 2) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == status and len(errors) == 1, err
    assert err.rstrip().splitlines()[-1] == errors[0], "the error is the last line"
    assert message in errors[0] and "Traceback" not in err, err


# ------------------------------------------------------------------ build options and paths

def _gguf(data: bytes):
    def make(tmp: Path) -> list:
        (tmp / "m.gguf").write_bytes(data)
        return ["--model", tmp / "m.gguf"]
    return make


BAD_BUILDS = {   # case -> (extra args, made from the test's folder; message)
    "model path missing": (lambda t: ["--model", t / "nope"], "does not exist"),
    "model a file, not .gguf": (lambda t: ["--model", t / "model" / "config.json"],
                                "is a file but not a .gguf file"),
    "model folder empty": (lambda t: ["--model", t / "model" / "empty"], "has no config.json"),
    "model not a GGUF file for int4-gguf": (lambda t: ["--quant", "int4-gguf"],
                                            "and the model is not a GGUF file"),
    "gguf random bytes": (_gguf(os.urandom(64)), "is not a readable GGUF file"),
    "gguf truncated": (_gguf(b"GGUF\x03\0"), "is not a readable GGUF file"),
    "gguf version 1": (_gguf(gguf_header(version=1)), "GGUF version 1"),
    "gguf without metadata": (_gguf(gguf_header()), "GGUF"),
    "gguf alignment 0": (_gguf(gguf_header(n_kv=1) + gguf_string(b"general.alignment")
                               + struct.pack("<II", 4, 0)), "general.alignment is 0"),
    "gguf tensor of no dimensions": (_gguf(gguf_header(n_tensors=1) + gguf_string(b"w")
                                           + struct.pack("<I", 0)), "has 0 dimensions"),
    "dtype unknown": (lambda t: ["--dtype", "int3"], "unsupported dtype 'int3'"),
    "kv block size 12": (lambda t: ["--kv-block-size", "12"], "kv_block_size must be a power"),
    "batch size 0": (lambda t: ["--max-batch-size", "0"], "max_batch_size"),
    "batch size not a number": (lambda t: ["--max-batch-size", "abc"], "'abc' is not a valid"),
    "unknown option": (lambda t: ["--bogus"], "No such option '--bogus'"),
    "unknown backend": (lambda t: ["--backend", "vulkan"], "'vulkan' is not one of"),
    "unknown pass": (lambda t: ["--disable-pass", "bogus"], "unknown pass ['bogus']"),
    "gpu arch off cuda": (lambda t: ["--gpu-arch", "sm_90a"], "applies to --backend cuda"),
    "fp8 first token off fp8": (lambda t: ["--quant", "int4-rtn", "--fp8-first-token",
                                           "static"], "and the build is --quant int4-rtn"),
    "fp8 first token dynamic on tensorrt": (
        lambda t: ["--quant", "fp8", "--fp8-first-token", "dynamic", "--backend",
                   "tensorrt-rtx"], "--fp8-first-token dynamic: tensorrt-rtx fuses an FP8 GEMM"),
    "output folder missing": (lambda t: ["-o", t / "no" / "x.engine"], "does not exist"),
    "output a folder": (lambda t: ["-o", t], "is a folder; give the engine a file name"),
    "output the weights": (lambda t: ["-o", t / "model" / "model.safetensors"],
                           "would overwrite the model being built"),
    "output in the model folder": (lambda t: ["-o", t / "model" / "new.engine"],
                                   "would overwrite the model being built"),
    "output a user's file": (lambda t: ["-o", t / "notes.txt"], "is not an llmc engine"),
    "output a device": (lambda t: ["-o", "/dev/null"], "is not a regular file"),
}


# options and outputs are checked before the model loads, not after
BEFORE_LOADING = {case for case in BAD_BUILDS if not case.startswith(("model", "gguf"))}


@pytest.mark.parametrize("case", BAD_BUILDS)
def test_a_bad_build_is_one_clear_error(capsys, tiny_models, tmp_path, case):
    make_args, message = BAD_BUILDS[case]
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama-gqa"][0], model)
    (model / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    args = ["--model", model, "-o", tmp_path / "x.engine", "--backend", "reference", *LIMITS,
            *make_args(tmp_path)]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, out, err = llmc(capsys, "build", *args)
    assert_one_error(code, err, message)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert case not in BEFORE_LOADING or "model:" not in err


def test_an_unwritable_output_folder(capsys, tiny_models, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    code, _, err = llmc(capsys, "build", "--model", tiny_models["llama-gqa"][0], "-o",
                        folder / "x.engine", *LIMITS)
    assert_one_error(code, err, "permission denied")


# ------------------------------------------------------------------ a full disk

@pytest.mark.parametrize("quant", [(), ("--quant", "int4-rtn")])
def test_too_little_free_space_is_refused_before_writing(capsys, tiny_models, tmp_path,
                                                          monkeypatch, words, quant):
    """The check reads the file system's real free space (statvfs); here that figure is
    shrunk to below what the build needs, as a nearly full disk would report it. A quantized
    build asks once it knows which GEMMs it packs, before it writes the unquantized graph."""
    from llmc import build

    real = build.free_bytes(tmp_path)
    st = os.statvfs(tmp_path)
    assert abs(real - st.f_bavail * st.f_frsize) < 64 << 20   # the real figure (others write)
    monkeypatch.setattr(build, "free_bytes", lambda folder: 100_000)
    text = ("--calib-data", str(words), "--eval-data", str(words)) if quant else ()
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = llmc(capsys, "build", "--model", tiny_models["llama-gqa"][0], "-o",
                        out / "x.engine", "--backend", "reference", *quant, *text, *LIMITS)
    assert_one_error(code, err, "not enough free space in")
    assert "and 100,000 bytes (0.1 MiB) are free" in err and "weights: " not in err
    assert ("the unquantized graph (" in err) == bool(quant)
    assert files_under(out) == set()


class _FillsUp(io.FileIO):
    """A file on a disk with `room` bytes left: past that, a write fails with ENOSPC."""
    room = 1 << 16

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


@pytest.mark.parametrize("where", ["engine", "weights"])
def test_a_disk_that_fills_up_during_the_write(capsys, tiny_models, tmp_path, monkeypatch,
                                               where):
    """A real full disk cannot be made here (no root, no small tmpfs), so the file the
    build writes is opened on a disk that fills up after 64 KiB: ENOSPC from the write
    call, as the kernel would raise it. The up-front check is passed on purpose."""
    from llmc import engine_file, graph

    if where == "engine":   # write_engine: os.fdopen of its .partial temporary
        real = os.fdopen
        monkeypatch.setattr(engine_file.os, "fdopen", lambda fd, mode="r", *a, **k: (
            io.BufferedWriter(_FillsUp(fd, "wb")) if mode == "wb" else real(fd, mode, *a, **k)))
    else:                   # save_onnx: the temporary weights.bin
        real_open = open
        monkeypatch.setattr(graph, "open", lambda path, mode="r", *a, **k: (
            io.BufferedWriter(_FillsUp(path, "wb")) if mode == "wb"
            else real_open(path, mode, *a, **k)), raising=False)
    code, _, err = llmc(capsys, "build", "--model", tiny_models["llama-gqa"][0], "-o",
                        tmp_path / "x.engine", "--backend", "reference", *LIMITS)
    assert_one_error(code, err, "the disk filled up while writing")
    assert "No space left on device" in err
    assert files_under(tmp_path) == set()   # no engine, no .partial, no llmc-build- folder


# ------------------------------------------------------------------ run and inspect

def _damaged(engine: Path, tmp: Path, edit) -> Path:
    bad = tmp / "bad.engine"
    raw = bytearray(engine.read_bytes())
    edit(raw)
    bad.write_bytes(bytes(raw))
    return bad


def _flip(offset: int):
    def edit(raw: bytearray):
        raw[offset] ^= 0xFF
    return edit


BAD_RUNS = {   # case -> (args, given the engine and the test's folder; message)
    "engine missing": (lambda e, t: ["run", t / "no.engine", "-p", "w3"], "does not exist"),
    "engine a folder": (lambda e, t: ["run", t, "-p", "w3"], "is a folder, not an engine"),
    "engine truncated": (lambda e, t: ["run", _damaged(e, t, lambda r: r.__delitem__(
        slice(-1000, None))), "-p", "w3"], "truncated"),
    "engine payload corrupted": (lambda e, t: ["run", _damaged(e, t, _flip(1 << 16)), "-p",
                                               "w3"], "payload checksum mismatch"),
    "engine header corrupted": (lambda e, t: ["run", _damaged(e, t, _flip(70)), "-p", "w3"],
                                "header checksum mismatch"),
    "engine header length huge": (lambda e, t: ["run", _damaged(
        e, t, lambda r: r.__setitem__(slice(16, 24), struct.pack("<Q", 2**62))), "-p", "w3"],
        "truncated (header incomplete)"),
    "engine of another format": (lambda e, t: ["run", _damaged(
        e, t, lambda r: r.__setitem__(slice(8, 12), struct.pack("<I", 1))), "-p", "w3"],
        "has engine format 1"),
    "engine a text file": (lambda e, t: ["inspect", _damaged(
        e, t, lambda r: r.__setitem__(slice(None), b"hello"))], "bad magic"),
    "no prompt": (lambda e, t: ["run", e], "no prompt given"),
    "system without chat": (lambda e, t: ["run", e, "-p", "w3", "--system", "x"],
                            "--system applies to --chat"),
    "seed -1": (lambda e, t: ["run", e, "-p", "w3", "--seed", "-1"], "seed"),
    "temperature nan": (lambda e, t: ["run", e, "-p", "w3", "--temperature", "nan"],
                        "temperature"),
    "temperature inf": (lambda e, t: ["run", e, "-p", "w3", "--temperature", "inf"],
                        "temperature"),
    "top-p 2": (lambda e, t: ["run", e, "-p", "w3", "--top-p", "2"], "top_p"),
    "logprobs 100": (lambda e, t: ["run", e, "-p", "w3", "--json", "--logprobs", "100"],
                     "logprobs"),
    "logprobs without json": (lambda e, t: ["run", e, "-p", "w3", "--logprobs", "2"],
                              "--logprobs prints each token's logprob in the JSON output; add "
                              "--json"),
    "json schema neither file nor JSON": (lambda e, t: ["run", e, "-p", "w3", "--json-schema",
                                                        "{oops"],
                                          "--json-schema takes a file or JSON text"),
    "json schema of an unknown type": (lambda e, t: ["run", e, "-p", "w3", "--json-schema",
                                                     '{"type": "foo"}'],
                                       "structured_outputs json: Invalid type: foo"),
    "regex that does not parse": (lambda e, t: ["run", e, "-p", "w3", "--regex", "a(b"],
                                  "regex parse error: unclosed group"),
    "two constraints": (lambda e, t: ["run", e, "-p", "w3", "--regex", "a", "--choice", "b"],
                        "give one of --json-schema, --regex, --choice and --grammar, not "
                        "--regex and --choice"),
    "grammar missing": (lambda e, t: ["run", e, "-p", "w3", "--grammar", t / "no.lark"],
                        "--grammar: cannot read"),
    "max-new-tokens -1": (lambda e, t: ["run", e, "-p", "w3", "--max-new-tokens", "-1"],
                          "max_tokens"),
    "prompt too long": (lambda e, t: ["run", e, "-p", " ".join(["w5"] * 40)],
                        "the prompt has 40 tokens; this engine allows at most 31"),
    "prompts file missing": (lambda e, t: ["run", e, "--prompts-file", t / "no.txt"],
                             "No such file or directory"),
    "prompts file without prompt": (lambda e, t: ["run", e, "--prompts-file", _text(
        t / "p.jsonl", '{"text": "x"}\n')], 'line 1: a JSON line needs a "prompt" field'),
    "speculative config not JSON": (lambda e, t: ["run", e, "-p", "w3",
                                                  "--speculative-config", "{ngram"],
                                    "--speculative-config is not valid JSON"),
    "speculative method unknown": (lambda e, t: ["run", e, "-p", "w3", "--speculative-config",
                                                 "eagle"],
                                   "speculative method 'eagle' is not one llmc has"),
    "speculative field unknown": (lambda e, t: ["serve", e, "--speculative-config",
                                                '{"num_speculative_tokens": 3, "k": 1}'],
                                  "--speculative-config has no field 'k'"),
    "speculative tokens 0": (lambda e, t: ["bench", e, "--speculative-config",
                                           '{"num_speculative_tokens": 0}'],
                             "num_speculative_tokens must be a whole number >= 1"),
    "speculative with bench --url": (lambda e, t: ["bench", "--url", "http://127.0.0.1:9",
                                                   "--speculative-config", "ngram"],
                                     "give it to `llmc serve`"),
    "another backend": (lambda e, t: ["run", e, "-p", "w3", "--backend", "tensorrt"],
                        "tensorrt"),
    "inspect missing": (lambda e, t: ["inspect", t / "no.engine"], "does not exist"),
    "eval text missing": (lambda e, t: ["eval", e, "--text", t / "no.txt"],
                          "cannot read the text file"),
    "eval text too short": (lambda e, t: ["eval", e, "--text", _text(t / "s.txt", "w3 w4 w5")],
                            "the evaluation text has 3 tokens; it needs at least 16"),
    "eval text of another language": (lambda e, t: ["eval", e, "--text", _text(
        t / "x.txt", "hello world " * 20)], "give a text in its language (--text)"),
    "eval windows past max_seq_len": (lambda e, t: ["eval", e, "--text", _text(
        t / "l.txt", " ".join(f"w{i % 120 + 3}" for i in range(100))), "--seq-len", "64"],
        "a window of 64 tokens is longer than this engine's max_seq_len (32); lower --seq-len"),
    "eval windows of 1": (lambda e, t: ["eval", e, "--seq-len", "1"], "--seq-len"),
    "eval reference missing": (lambda e, t: ["eval", e, "--reference", t / "no.engine"],
                               "does not exist"),
}


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("make_args, message", BAD_RUNS.values(), ids=BAD_RUNS)
def test_a_bad_run_is_one_clear_error(capsys, engine, tmp_path, make_args, message):
    args = make_args(engine, tmp_path)
    before = files_under(tmp_path)
    code, out, err = llmc(capsys, *args)
    assert_one_error(code, err, message)
    assert out == "" and files_under(tmp_path) == before


# ------------------------------------------------------------------ --verbose and bugs

def test_verbose_shows_the_traceback_before_the_error(capsys, tmp_path):
    for args in (["--verbose", "inspect", tmp_path / "no.engine"],
                 ["inspect", tmp_path / "no.engine", "--verbose"]):
        code, _, err = llmc(capsys, *args)
        assert code == 2 and err.startswith("Traceback") and "EngineFile" in err
        assert err.rstrip().splitlines()[-1].startswith("error: engine file")


def test_a_bug_is_one_line_that_asks_for_a_report(capsys, engine, monkeypatch):
    from llmc.engine_file import EngineFile

    def broken(self):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(EngineFile, "verify_payload", broken)
    code, _, err = llmc(capsys, "inspect", engine)
    assert_one_error(code, err, "internal error (ZeroDivisionError: division by zero); this "
                                "is a bug in llmc: rerun with --verbose", status=1)
    code, _, err = llmc(capsys, "inspect", engine, "--verbose")
    assert code == 1 and "Traceback" in err and "in broken" in err


def test_a_prompt_that_is_not_unicode_is_one_clear_error(engine):
    """argv bytes that are not UTF-8 reach Python only through a real process."""
    r = subprocess.run([sys.executable, "-m", "llmc", "run", str(engine), "-p", b"w3 \xff"],
                       capture_output=True, timeout=300)
    r.stdout, r.stderr = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    assert_one_error(r.returncode, r.stderr, "error: the prompt cannot be tokenized")
    assert r.stdout == ""


# ------------------------------------------------------------------ Ctrl-C

def deep_model(tiny: Path, folder: Path, layers: int) -> Path:
    """The tiny llama with its two layers repeated to `layers`: a TensorRT build of a few
    seconds, long enough to interrupt (no torch needed)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(tiny, folder)
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.startswith("model.layers.")]:
        _, _, k, rest = name.split(".", 3)
        for copy in range(int(k), layers, 2):
            tensors[f"model.layers.{copy}.{rest}"] = tensors[name]
    save_file(tensors, folder / "model.safetensors")
    edit_config(num_hidden_layers=layers)(folder)
    return folder


def test_ctrl_c_stops_a_tensorrt_rtx_build_and_leaves_nothing(tiny_models, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    model = deep_model(tiny_models["llama-gqa"][0], tmp_path / "deep", layers=24)
    out = tmp_path / "out"
    out.mkdir()
    # A shell starts a background job with SIGINT ignored, and a child inherits that (a
    # Python started so never raises KeyboardInterrupt): the build starts with Ctrl-C as a
    # terminal's foreground job has it, whatever this process has.
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        p = subprocess.Popen([sys.executable, "-m", "llmc", "build", "--model", model, "-o",
                              out / "x.engine", "--backend", "tensorrt-rtx", *LIMITS],
                             stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, saved)
    seen = []
    for line in p.stderr:   # wait until TensorRT's builder is at work
        seen.append(line)
        if "building a tensorrt-rtx" in line:
            break
    time.sleep(0.5)
    import psutil

    builders = psutil.Process(p.pid).children(recursive=True)
    assert builders, "the builder runs in a child process"
    sent = time.monotonic()
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    p.wait(timeout=30)
    assert p.returncode == 130 and time.monotonic() - sent < 5, "".join(seen) + rest
    assert "built in" not in rest, "the build finished before the signal: make it longer"
    assert [x for x in rest.splitlines() if x.strip()] == ["error: interrupted"]
    assert files_under(out) == set()
    _, alive = psutil.wait_procs(builders, timeout=5)   # the builder (and spawn's tracker)
    assert not alive, [b.cmdline() for b in alive]
