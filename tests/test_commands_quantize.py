"""`localmix quantize` as a user runs it: the default output in the model store, the summary, and every
bad input answered by one clear line, a non-zero exit and nothing left at OUT."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support.cli import run_cli
from tests.support.ggufs import metadata


def assert_clean_failure(result, out: Path, expect: str):
    err = result.stderr.strip()
    assert result.returncode != 0
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert expect in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if "partial" in p.name] if out.parent.exists() else True


def test_default_output_goes_to_the_model_store_with_a_summary(tiny):
    r = run_cli("quantize", str(tiny))
    assert r.returncode == 0, r.stderr
    out = Path(os.environ["LOCALMIX_HOME"]) / "models" / "tiny-mixtral-v3-Q4_K_M.gguf"
    assert out.is_file()
    assert f"Wrote {out}\n" in r.stdout
    text = " ".join(r.stdout.split())  # the table wraps to the terminal's width
    assert "bits per weight" in text and "Q4_K 15" in text and "peak memory" in text
    assert "8 experts, top-2" in text


def test_output_exists_needs_force(tiny, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    r = run_cli("quantize", str(tiny), "-o", str(out), "--type", "q8_0")
    assert r.returncode == 1 and "already exists" in r.stderr and "--force" in r.stderr
    assert out.read_bytes() == b"keep me"
    r = run_cli("quantize", str(tiny), "-o", str(out), "--type", "Q8_0", "--force")
    assert r.returncode == 0, r.stderr
    assert metadata(out)["general.file_type"] == 7


def test_metadata_users_and_llama_cpp_need(tiny_gguf, upcycled_gguf):
    m = metadata(tiny_gguf("Q4_K_M"))
    assert m["general.architecture"] == "llama"
    assert m["llama.expert_count"] == 8 and m["llama.expert_used_count"] == 2
    assert m["llama.rope.freq_base"] == 1e6  # from config.json's rope_parameters
    assert m["llama.context_length"] == 4096
    assert m["llama.rope.dimension_count"] == 64 and m["llama.attention.head_count_kv"] == 2
    assert m["tokenizer.ggml.model"] == "llama"
    assert (m["tokenizer.ggml.bos_token_id"], m["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert m["tokenizer.ggml.add_bos_token"] is True
    assert "[INST]" in m["tokenizer.chat_template"]  # from tokenizer_config.json
    assert m["localmix.version"] and m["general.quantized_by"].startswith("localmix")
    assert m["general.file_type"] == 15 and m["general.quantization_version"] == 2
    tokens, types = m["tokenizer.ggml.tokens"], m["tokenizer.ggml.token_type"]
    for control in ("[AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[INST]"):
        assert types[tokens.index(control)] == 3, control  # CONTROL: Mixtral 8x22B's v3 tool tokens

    u = metadata(upcycled_gguf("Q4_K_M"))
    assert u["tokenizer.ggml.model"] == "gpt2" and u["tokenizer.ggml.pre"] == "smollm"
    assert "<|im_start|>" in u["tokenizer.chat_template"]  # from chat_template.jinja
    assert u["llama.rope.freq_base"] == 1e5


def test_v3_control_tokens_are_special_in_llama_cpp(tiny_gguf):
    from llama_cpp import Llama

    llm = Llama(str(tiny_gguf("Q4_K_M")), vocab_only=True, verbose=False)
    ids = llm.tokenize(b"[AVAILABLE_TOOLS][TOOL_CALLS][TOOL_RESULTS]", add_bos=False, special=True)
    llm.close()
    assert ids == [6, 5, 8]


def test_rope_theta_at_top_level_and_source_from_hub_cache(tiny, tmp_path, monkeypatch):
    """An older config.json (rope_theta at top level), read from the Hugging Face cache as a hub id:
    the GGUF records the repo and the revision."""
    hf_home = Path(os.environ["HF_HOME"])
    snap = hf_home / "hub" / "models--acme--tiny-moe" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny, snap)
    (hf_home / "hub" / "models--acme--tiny-moe" / "refs").mkdir()
    (hf_home / "hub" / "models--acme--tiny-moe" / "refs" / "main").write_text("a" * 40)
    cfg = json.loads((snap / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = 123456.0
    (snap / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "hub.gguf"
    r = run_cli("quantize", "acme/tiny-moe", "-o", str(out), "--type", "Q4_0")
    assert r.returncode == 0, r.stderr
    m = metadata(out)
    assert m["llama.rope.freq_base"] == 123456.0
    assert m["general.source.huggingface.repository"] == "acme/tiny-moe"
    assert m["localmix.source.revision"] == "a" * 40


def test_chat_template_from_jinja_file(tiny, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(tiny, src)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    (src / "chat_template.jinja").write_text("{{ 'JINJA-TEMPLATE' }}")
    r = run_cli("quantize", str(src), "-o", str(tmp_path / "j.gguf"), "--type", "Q4_0")
    assert r.returncode == 0, r.stderr
    assert metadata(tmp_path / "j.gguf")["tokenizer.chat_template"] == "{{ 'JINJA-TEMPLATE' }}"


# ---- bad input -------------------------------------------------------------------------------------


@pytest.fixture
def broken(tiny, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(tiny, src)
    return src


def _shards(folder):
    return sorted(folder.glob("model-*.safetensors"))


def test_missing_shard(broken, tmp_path):
    _shards(broken)[2].unlink()
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    assert_clean_failure(run_cli("quantize", str(broken), "-o", str(out)), out, "is missing")


def test_truncated_shard(broken, tmp_path):
    shard = _shards(broken)[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    out = tmp_path / "m.gguf"
    assert_clean_failure(run_cli("quantize", str(broken), "-o", str(out)), out, "truncated safetensors file")


def test_corrupt_header(broken, tmp_path):
    with open(_shards(broken)[0], "r+b") as f:
        f.write((2**40).to_bytes(8, "little"))
    out = tmp_path / "m.gguf"
    assert_clean_failure(run_cli("quantize", str(broken), "-o", str(out)), out, "corrupt safetensors header")


def test_unsupported_dtype(broken, tmp_path):
    from safetensors.numpy import save_file

    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "norm-f64.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"model.norm.weight": np.ones(256, dtype=np.float64)}, broken / "norm-f64.safetensors")
    out = tmp_path / "m.gguf"
    assert_clean_failure(run_cli("quantize", str(broken), "-o", str(out)), out, "unsupported dtype F64")


def test_unsupported_architecture(broken, tmp_path):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    (broken / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "m.gguf"
    assert_clean_failure(run_cli("quantize", str(broken), "-o", str(out)), out, "unsupported architecture Qwen2ForCausalLM")


def test_missing_source_and_offline_hub(tmp_path):
    out = tmp_path / "m.gguf"
    assert_clean_failure(run_cli("quantize", str(tmp_path / "nope"), "-o", str(out)), out, "no such folder")
    r = run_cli("quantize", "mistralai/Mixtral-8x7B-Instruct-v0.1", "-o", str(out))
    assert_clean_failure(r, out, "not in the local Hugging Face cache")


def test_bad_flag_and_type():
    r = run_cli("quantize", "x", "--type", "Q3_K_XL")
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr


def test_write_failure_midway_leaves_nothing(tiny, tmp_path):
    """A write that fails halfway (here: a 4 MB file-size limit, as a full disk would) removes the
    partial file."""
    out = tmp_path / "m.gguf"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    r = run_cli("quantize", str(tiny), "-o", str(out), "--type", "BF16", preexec_fn=limit)
    assert_clean_failure(r, out, "cannot write")


def test_ctrl_c_midway_leaves_nothing(upcycled, tmp_path):
    out = tmp_path / "m.gguf"
    env = {**os.environ}
    proc = subprocess.Popen(
        [sys.executable, "-m", "localmix", "quantize", str(upcycled), "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the output is really being written
        partial = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
        if partial and partial[0].stat().st_size > 20 << 20:
            break
        time.sleep(0.05)
    else:
        pytest.fail("conversion never started writing")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_filesystem(tmp_path):
    """An 8 MiB tmpfs (needs root, as on the project's machines; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_not_enough_disk_space_is_found_before_writing(tiny, small_filesystem):
    out = small_filesystem / "m.gguf"
    r = run_cli("quantize", str(tiny), "-o", str(out))  # about 20 MiB of output
    assert_clean_failure(r, out, "not enough disk space")
    assert list(small_filesystem.iterdir()) == []


def test_partial_file_of_a_killed_quantize_is_removed_by_the_next_one(upcycled, tiny, tmp_path):
    """SIGKILL leaves the hidden partial output (for Mixtral 8x22B up to 85 GB); the next quantize into
    that folder removes it, and says so in one line."""
    from localmix.units import fmt_bytes

    out = tmp_path / "m.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "localmix", "quantize", str(upcycled), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / f".m.gguf.{proc.pid}.partial"
    deadline = time.time() + 120
    while time.time() < deadline and not (partial.is_file() and partial.stat().st_size > 20 << 20):
        time.sleep(0.02)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert partial.is_file() and not out.exists()  # what a SIGKILL leaves
    size = partial.stat().st_size

    r = run_cli("quantize", str(tiny), "-o", str(tmp_path / "tiny.gguf"), "--type", "Q4_0")
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if "partial" in line]
    assert said == [f"localmix quantize: removed a partial file left by an interrupted quantize (pid {proc.pid}, "
                    f"{fmt_bytes(size)}): {partial}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_threads_and_output_flags_are_checked_in_one_line(tiny, tmp_path):
    for args, code, expect in [
        (["--threads", "-1"], 2, "-1 is out of range: a thread count from 1 to 512"),
        (["--threads", "0"], 2, "0 is out of range"),
        (["-o", ""], 1, "-o needs a file name"),
        (["-o", str(tmp_path)], 1, "is a folder; the output must be a file name"),
    ]:
        r = run_cli("quantize", str(tiny), *(args if "-o" in args else ["-o", str(tmp_path / "m.gguf"), *args]))
        err = r.stderr.strip()
        assert r.returncode == code and len(err.splitlines()) == 1 and expect in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_broken_json_file_is_one_line_naming_it(tiny, tmp_path):
    from tests.support.checkpoints import linked_copy, put

    src = linked_copy(tiny, tmp_path / "ckpt")
    put(src / "config.json", '{"architectures": ["MixtralForCausalLM"], "hidden_size": 2')
    out = tmp_path / "m.gguf"
    assert_clean_failure(run_cli("quantize", str(src), "-o", str(out)), out, "error: config.json is not valid JSON: Expecting")


# -- importance matrices (issue 11) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auto_run(tiny, tmp_path_factory):
    """`--imatrix auto` on the tiny Mixtral, 2048 calibration tokens of the built-in text."""
    out = tmp_path_factory.mktemp("auto") / "tiny-auto.gguf"
    r = run_cli("quantize", str(tiny), "-o", str(out), "--type", "Q4_K_M", "--imatrix", "auto", "--calibration-tokens", "2048")
    return r, out


def test_imatrix_auto_saves_the_imatrix_beside_the_output(auto_run):
    from quantize.imatrix import read_imatrix

    r, out = auto_run
    assert r.returncode == 0, r.stderr
    saved = out.with_name("tiny-auto.imatrix.gguf")
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny-auto.gguf", "tiny-auto.imatrix.gguf"]
    text = " ".join(r.stdout.split())
    assert f"saved to {saved}" in text and "computed from 2048 tokens" in text and "(calibration " in text
    im = read_imatrix(saved)
    assert (im.chunk_count, im.chunk_size) == (4, 512) and len(im.entries) == 4 * 8
    m = metadata(out)
    assert m["quantize.imatrix.file"] == "auto" and m["quantize.imatrix.chunks_count"] == 4
    counts = np.array(m["localmix.routing.expert_counts"]).reshape(4, 8)
    assert m["localmix.routing.tokens"] == 2048 and (counts.sum(axis=1) == 2048 * 2).all()  # top-2
    np.testing.assert_array_equal(counts[1], im.entries["blk.1.ffn_up_exps.weight"].counts)


@pytest.mark.llama_tools
def test_the_saved_imatrix_gives_llama_quantize_the_same_file(auto_run, tiny_gguf, tmp_path):
    from tests.support.ggufs import differences
    from tests.support.llama_tools import run_tool

    r, out = auto_run
    assert r.returncode == 0, r.stderr
    theirs = tmp_path / "theirs.gguf"
    q = run_tool("llama-quantize", "--imatrix", out.with_name("tiny-auto.imatrix.gguf"), tiny_gguf("BF16"), theirs, "Q4_K_M", 2)
    assert q.returncode == 0, q.stderr[-2000:]
    assert differences(out, theirs) == []


def test_imatrix_file_in_the_summary(tiny, tmp_path):
    from quantize.imatrix import Entry, Imatrix, write_imatrix

    rng = np.random.default_rng(0)
    entries = {f"blk.{b}.{n}.weight": Entry(rng.uniform(0.1, 1, (k, 256)).astype(np.float32), np.full(k, 10, np.int64))
               for b in range(4) for n, k in (("attn_q", 1), ("ffn_up_exps", 8))}
    write_imatrix(Imatrix(entries, 3, 512, ["mine.txt"]), tmp_path / "x.imatrix.gguf")
    out = tmp_path / "m.gguf"
    r = run_cli("quantize", str(tiny), "-o", str(out), "--type", "Q4_0", "--imatrix", str(tmp_path / "x.imatrix.gguf"))
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "(8 entries, 3 chunks): 8 tensors weighted" in text
    assert metadata(out)["quantize.imatrix.dataset"] == "mine.txt"


def test_imatrix_auto_without_torch_is_one_line_naming_the_extra(tiny, tmp_path):
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    out = tmp_path / "m.gguf"
    r = run_cli("quantize", str(tiny), "-o", str(out), "--imatrix", "auto", env={"PYTHONPATH": str(tmp_path / "site")})
    assert_clean_failure(r, out, "--imatrix auto needs torch: pipx inject localmix torch, or pip install 'localmix[calibrate]'")


def test_calibration_flags_are_checked_in_one_line(tiny, tmp_path):
    out = tmp_path / "m.gguf"
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for args, code, expect in [
        (["--calibration-text", str(tmp_path / "empty.txt")], 1, "go with --imatrix auto"),
        (["--calibration-tokens", "100"], 1, "go with --imatrix auto"),
        (["--imatrix", "auto", "--calibration-tokens", "0"], 2, "0 is out of range"),
        (["--imatrix", "auto", "--calibration-text", str(tmp_path / "none.txt")], 1, "cannot read calibration text"),
        (["--imatrix", "auto", "--calibration-text", str(tmp_path / "empty.txt")], 1, "is empty"),
        (["--imatrix", "auto", "--calibration-text", str(tmp_path / "latin1.txt")], 1, "is not UTF-8 text"),
        (["--imatrix", "auto", "--calibration-tokens", "100"], 1, "calibration needs at least 512 tokens"),
        (["--imatrix", ""], 1, "--imatrix needs 'auto' or a file name"),
        (["--type", "IQ3_XXS"], 1, "IQ3_XXS needs an importance matrix"),
    ]:
        r = run_cli("quantize", str(tiny), "-o", str(out), *args)
        err = r.stderr.strip()
        assert r.returncode == code and len(err.splitlines()) == 1 and expect in err and "Traceback" not in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "latin1.txt"]


def test_an_existing_imatrix_beside_the_output_needs_force(tiny, tmp_path):
    saved = tmp_path / "m.imatrix.gguf"
    saved.write_bytes(b"keep me")
    out = tmp_path / "m.gguf"
    assert_clean_failure(run_cli("quantize", str(tiny), "-o", str(out), "--imatrix", "auto"), out, "m.imatrix.gguf already exists")
    assert saved.read_bytes() == b"keep me"


def test_own_calibration_text_is_the_dataset(tiny, tmp_path):
    from quantize.imatrix import read_imatrix

    text = tmp_path / "my text.txt"
    text.write_text((Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8") * 2, encoding="utf-8")
    out = tmp_path / "m.gguf"
    r = run_cli("quantize", str(tiny), "-o", str(out), "--type", "Q4_0", "--imatrix", "auto",
                "--calibration-text", str(text), "--calibration-tokens", "600")
    assert r.returncode == 0, r.stderr
    assert read_imatrix(tmp_path / "m.imatrix.gguf").datasets == [str(text)]
    assert metadata(out)["quantize.imatrix.dataset"] == str(text)


def test_ctrl_c_during_calibration_leaves_nothing(tiny, tmp_path):
    out = tmp_path / "m.gguf"
    proc = subprocess.Popen(
        [sys.executable, "-m", "localmix", "quantize", str(tiny), "-o", str(out), "--imatrix", "auto", "--calibration-tokens", "8192"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]:
        time.sleep(0.05)
    time.sleep(1.0)  # the header is written and the first layer's tensors wait for the calibration of layer 0
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
