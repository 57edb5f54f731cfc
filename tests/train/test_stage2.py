"""Stage 2 end to end, tiny: `finevit train stage2` from a (random) stage-1 checkpoint with a tiny LM,
exact resume, both exports reloaded in a fresh interpreter, and start-up errors on bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from tests.eval.conftest import TINY_MODEL, save_stage1_checkpoint
from tests.train.conftest import Stage1Data, finevit_cli

STEPS = 10


def recipe(**over: object) -> dict:
    cfg = {
        "model": TINY_MODEL,
        "data": {
            "regions_layer": "gt-regions",
            "global_layer": "gt-global",
            "tasks": [
                {"task": "box_caption", "weight": 0.45},
                {"task": "caption_box", "weight": 0.45},
                {"task": "global", "weight": 0.1},
            ],
            "max_patches": 48,
            "seq_len": 160,
            "batch": 4,
            "max_len": 160,
        },
        "schedule": [{"until": 2, "train": "projector"}, {"until": 1000000, "train": "all"}],
        "optim": {"lr": 3.0e-3, "weight_decay": 0.0, "warmup_steps": 2, "grad_clip": 1.0},
        "loop": {"steps": STEPS, "seed": 0},
        "checkpoint": {"every": 0},
        "log": {"every": 1, "tensorboard": False, "progress": False},
    }
    cfg.update(over)
    return cfg


class Setup:
    def __init__(self, base: Path, data: Stage1Data) -> None:
        from train.stage2 import make_tiny_lm

        self.base, self.data = base, data
        self.stage1 = save_stage1_checkpoint(base / "stage1", data.tokenizer).run
        self.lm = Path(make_tiny_lm(str(data.tokenizer), str(base / "lm"), hidden=32, layers=1, heads=2))
        self.config = base / "stage2.yaml"
        self.config.write_text(yaml.safe_dump(recipe()))

    def train(self, log_dir: Path, *extra: str, config: Path | None = None, lm: Path | None = None) -> int:
        return finevit_cli(
            [
                "train",
                "stage2",
                "--config",
                str(config or self.config),
                "--init",
                str(self.stage1),
                "--lm",
                str(lm or self.lm),
                "--dataset",
                str(self.data.root),
                "--log-dir",
                str(log_dir),
                *extra,
            ]
        )


def losses(log_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, stage1_data: Stage1Data) -> Setup:
    return Setup(tmp_path_factory.mktemp("stage2"), stage1_data)


@pytest.fixture(scope="module")
def trained(setup: Setup) -> Path:
    run = setup.base / "run"
    assert setup.train(run) == 0
    return run


@pytest.mark.slow
def test_stage2_trains_with_falling_loss_and_writes_a_checkpoint(trained: Path) -> None:
    got = losses(trained)
    assert sorted(got) == list(range(1, STEPS + 1))
    # noisy per step (4 samples a batch, mixed tasks): the first two against the last three
    first = (got[1] + got[2]) / 2
    last = sum(got[s] for s in range(STEPS - 2, STEPS + 1)) / 3
    assert last < first - 0.15, got
    assert [p.name for p in (trained / "checkpoints").glob("step_*")] == [f"step_{STEPS:08d}"]
    assert (trained / "checkpoints" / "stage2_config.json").is_file()


@pytest.mark.slow
def test_stage2_resume_is_exact(setup: Setup, trained: Path) -> None:
    run = setup.base / "resumed"
    assert setup.train(run, "--set", f"loop.stop_at={STEPS // 2}") == 0
    assert sorted(losses(run)) == list(range(1, STEPS // 2 + 1))
    assert setup.train(run) == 0
    assert losses(run) == losses(trained)


REGION = [
    "--set",
    "loss.region_contrast=1.0",
    "--set",
    "loss.global_contrast=1.0",
    "--set",
    "loss.region_hard_negatives=1.0",
    "--set",
    "data.upscale=true",
    "--set",
    "optim.align_lr_mult=1.0",
    "--set",
    "checkpoint.every=5",
]


@pytest.mark.slow
def test_region_contrast_run_resumes_exactly_and_exports_its_text_tower(setup: Setup, tmp_path: Path) -> None:
    """With ``loss.region_contrast`` (and its global and hard-negative companions, at an upscaled
    resolution) the text tower, temperature, head and projection train: the run logs the four
    losses, resumes bit-exactly, the encoder export carries stage 2's text tower, pooling head and
    resolution (not stage 1's), and the VLM export leaves the text tower out."""
    from safetensors.torch import load_file

    from train.model.encoder import load_encoder
    from train.stage2 import load_stage2

    whole, part = tmp_path / "whole", tmp_path / "part"
    assert setup.train(whole, *REGION) == 0
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    # the term runs in the phases that train the encoder (the recipe's "all" from step 2 on)
    terms = {"lm_loss", "region_loss", "global_loss", "hard_negative_loss"}
    assert all(terms <= set(r) for r in rows if "loss" in r and r["step"] > 2), rows
    assert not any({"region_loss", "global_loss"} & set(r) for r in rows if r.get("step", 0) <= 2), rows
    assert setup.train(part, *REGION, "--set", f"loop.stop_at={STEPS // 2}") == 0
    assert setup.train(part, *REGION) == 0
    assert losses(part) == losses(whole)

    vlm, _, _ = load_stage2(str(whole))
    stage1 = load_encoder(str(setup.stage1))
    out = tmp_path / "encoder"
    assert finevit_cli(["export", str(whole), str(out), "--part", "encoder"]) == 0
    enc = load_encoder(str(out))
    # read at the resolution stage 2 trained it at (its data.upscale, its budget), not stage 1's
    assert (enc.preprocess.upscale, enc.preprocess.max_patches) == (True, 48), enc.preprocess
    for name, trained_p in vlm.region_align.text.state_dict().items():
        torch.testing.assert_close(enc.text.state_dict()[name], trained_p, rtol=0, atol=0, msg=name)
    changed = [k for k, v in stage1.text.state_dict().items() if not torch.equal(v, enc.text.state_dict()[k])]
    assert changed, "the exported text tower is stage 1's"
    assert not torch.equal(stage1.vision.proj.weight, enc.vision.proj.weight), "the projection did not train"
    vlm_out = tmp_path / "vlm"
    assert finevit_cli(["export", str(whole), str(vlm_out), "--part", "vlm"]) == 0
    assert not [k for k in load_file(str(vlm_out / "model.safetensors")) if k.startswith("region_align.")]


LORA = [
    "--set",
    "lm.lora.r=4",
    "--set",
    "lm.lora.alpha=8",
    "--set",
    "loop.steps=4",
    "--set",
    "checkpoint.every=2",
]


@pytest.mark.slow
def test_lora_run_resumes_exactly_and_exports_merged_as_a_plain_lm(setup: Setup, tmp_path: Path) -> None:
    """LoRA on the LM (lm.lora): the base weights in the checkpoint are the LM directory's, bit for
    bit; stop + resume gives the uninterrupted losses; the VLM export (adapters merged) loaded with
    transformers' Auto classes gives the adapted model's logits."""
    from transformers import AutoModelForCausalLM

    from train.export import load_vlm
    from train.stage2 import load_stage2

    full, part = tmp_path / "full", tmp_path / "part"
    assert setup.train(full, *LORA) == 0
    assert setup.train(part, *LORA, "--set", "loop.stop_at=2") == 0
    assert setup.train(part, *LORA) == 0
    assert losses(part) == losses(full) and sorted(losses(full)) == [1, 2, 3, 4]

    adapted, proc, cfg = load_stage2(str(full), merge=False)
    assert cfg.lm.lora.r == 4
    base = AutoModelForCausalLM.from_pretrained(setup.lm).state_dict()
    lm_sd = adapted.language_model.state_dict()
    lora_b = [v for k, v in lm_sd.items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # the adapters trained
    for k, v in base.items():
        if "embed_tokens" in k or "lm_head" in k:  # resized for the image / region tokens
            continue
        plain, wrapped = f"base_model.model.{k}", f"base_model.model.{k[: -len('.weight')]}.base_layer.weight"
        assert torch.equal(lm_sd[wrapped if wrapped in lm_sd else plain], v), k

    out = tmp_path / "vlm"
    assert finevit_cli(["export", str(full), str(out), "--part", "vlm"]) == 0
    net, proc2 = load_vlm(str(out))
    assert type(net.language_model).__name__ == "LlamaForCausalLM"
    msgs = [
        proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}]
        )
        for t in ("Describe the region <box>(100,200),(600,900)</box>.", "Describe the image.")
    ]
    with torch.no_grad():
        want = adapted(**proc(images=_images(), text=msgs)).logits
        got = net(**proc2(images=_images(), text=msgs)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def _images() -> list[Image.Image]:
    return [
        Image.new("RGB", (64, 48), (200, 30, 30)),
        Image.linear_gradient("L").convert("RGB").resize((96, 64)),
    ]


def _run_fresh(code: str, tmp: Path) -> None:
    script = tmp / "fresh.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], cwd=tmp, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


IMAGES_SRC = """
from PIL import Image
ims = [Image.new("RGB", (64, 48), (200, 30, 30)), Image.linear_gradient("L").convert("RGB").resize((96, 64))]
"""


@pytest.mark.slow
def test_encoder_export_reloads_identically_in_a_fresh_interpreter(
    setup: Setup, trained: Path, tmp_path: Path
) -> None:
    from train.model.encoder import load_encoder
    from train.stage2 import load_stage2

    out = tmp_path / "encoder"
    assert finevit_cli(["export", str(trained), str(out), "--part", "encoder"]) == 0
    # the reference: the stage-1 encoder with the stage-2 vision weights, in this process
    ref = load_encoder(str(setup.stage1))
    vlm, _, _ = load_stage2(str(trained))
    ref.vision.load_state_dict(vlm.vision.state_dict())
    texts = ["a red circle.", "a blue square on the left."]
    want_img, want_txt = ref.encode_image(_images()), ref.encode_text(texts)
    _run_fresh(
        IMAGES_SRC
        + f"""
import torch
from transformers import AutoModel
from train.model.encoder import load_encoder
texts = {texts!r}
lib = load_encoder({str(out)!r})
hf = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
torch.save({{"lib": (lib.encode_image(ims), lib.encode_text(texts)),
            "hf": (hf.encode_image(ims), hf.encode_text(texts))}}, "emb.pt")
""",
        tmp_path,
    )
    got = torch.load(tmp_path / "emb.pt")
    for name in ("lib", "hf"):
        img, txt = got[name]
        torch.testing.assert_close(img, want_img, rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(txt, want_txt, rtol=0, atol=1e-5, msg=name)


GENERATE_SRC = """
def greedy(net, proc, ims, prompts):
    import torch
    proc.tokenizer.padding_side = "left"
    msgs = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}])
            for p in prompts]
    inp = proc(images=ims, text=msgs, padding=True, return_tensors="pt")
    with torch.inference_mode():
        ids = net.generate(**inp, max_new_tokens=12, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id)
    return ids[:, inp["input_ids"].shape[1]:].tolist()
"""


@pytest.mark.slow
def test_vlm_export_generates_identically_in_a_fresh_interpreter(trained: Path, tmp_path: Path) -> None:
    from train.data.regions import box_text
    from train.stage2 import load_stage2

    out = tmp_path / "vlm"
    assert finevit_cli(["export", str(trained), str(out), "--part", "vlm"]) == 0
    prompts = [f"What is in {box_text((0.1, 0.2, 0.6, 0.9))}?", "Describe the image."]
    ns: dict = {}
    exec(GENERATE_SRC, ns)
    net, proc, _ = load_stage2(str(trained))
    want = ns["greedy"](net, proc, _images(), prompts)
    assert all(len(w) > 0 for w in want)
    _run_fresh(
        IMAGES_SRC
        + GENERATE_SRC
        + f"""
import json
from transformers import AutoModelForImageTextToText, AutoProcessor
proc = AutoProcessor.from_pretrained({str(out)!r}, trust_remote_code=True)
net = AutoModelForImageTextToText.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
json.dump(greedy(net, proc, ims, {prompts!r}), open("ids.json", "w"))
""",
        tmp_path,
    )
    assert json.loads((tmp_path / "ids.json").read_text()) == want


@pytest.mark.slow
def test_stage1_checkpoint_mismatching_the_recipe_stops_at_start(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wide = recipe(model={**TINY_MODEL, "vision": {**TINY_MODEL["vision"], "width": 48}})
    config = tmp_path / "wide.yaml"
    config.write_text(yaml.safe_dump(wide))
    capsys.readouterr()
    assert setup.train(tmp_path / "run", config=config) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "does not match" in err and "model.vision" in err and "width 48" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("remove", ["tokenizer", "chat_template"])
def test_lm_without_tokenizer_or_chat_template_is_a_clear_error(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str], remove: str
) -> None:
    lm = tmp_path / "lm"
    shutil.copytree(setup.lm, lm)
    if remove == "tokenizer":
        for p in lm.iterdir():
            if p.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                p.unlink()
    else:
        (lm / "chat_template.jinja").unlink(missing_ok=True)
        tc = json.loads((lm / "tokenizer_config.json").read_text())
        tc.pop("chat_template", None)
        (lm / "tokenizer_config.json").write_text(json.dumps(tc))
    capsys.readouterr()
    assert setup.train(tmp_path / "run", lm=lm) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("finevit: error: lm.path"), err
    assert str(lm) in err and (remove.replace("_", " ") in err), err


@pytest.mark.slow
def test_exported_vlm_serves_as_a_captioner_and_writes_a_layer(
    trained: Path, stage1_data: Stage1Data, tmp_path: Path
) -> None:
    import os
    import socket
    import time
    import urllib.request

    from engine.layers import read_layer

    out = tmp_path / "vlm"
    assert finevit_cli(["export", str(trained), str(out), "--part", "vlm"]) == 0
    ds = tmp_path / "ds"
    shutil.copytree(stage1_data.root, ds)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = [sys.executable, "-m", "finevit"]
    server = subprocess.Popen(
        [*cli, "serve-captioner", str(out), "--port", str(port), "--device", "cpu", "--trust-remote-code"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "serve-captioner did not come up"
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        common = [
            "--backend",
            "openai",
            "--endpoint",
            url,
            "--limit",
            "16",
            "--retries",
            "0",
            "--no-progress",
        ]
        for task in (
            ["--task", "global", "--layer", "s2-global", "--max-tokens", "8", "--keep-truncated"],
            # boxes from the ground-truth layer, the prompt stage 2 trained on: the server's processor
            # gives each box its region token (a missing region box would fail every row)
            [
                "--task",
                "regions",
                "--layer",
                "s2-regions",
                "--region-mode",
                "proposals",
                "--proposals-layer",
                "gt-regions",
                "--prompt",
                str(Path(__file__).resolve().parents[2] / "configs/prompts/stage2-region.txt"),
                "--max-tokens",
                "8",
                "--keep-truncated",
            ],
        ):
            r = subprocess.run(
                [*cli, "recaption", str(ds), *task, *common], capture_output=True, text=True, timeout=300
            )
            assert r.returncode == 0, r.stderr[-3000:]
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
    rows = read_layer(str(ds), "s2-global").to_pylist()
    assert len(rows) == 16
    ok = [x for x in rows if x["status"] == "ok"]
    assert len(ok) == 16 and all(x["model"] == "vlm" and isinstance(x["caption"], str) for x in ok), rows[:2]
    regions = read_layer(str(ds), "s2-regions").to_pylist()
    assert len(regions) == 16 and all(x["status"] == "ok" for x in regions), regions[:2]
    boxes = [b for x in regions for b in x["regions"]]
    assert boxes and all(isinstance(b["caption"], str) and b["caption"] for b in boxes), boxes[:3]
