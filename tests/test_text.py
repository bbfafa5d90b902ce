"""The text side, build and serving: the CLIP text tower's ONNX (parity with open_clip's encode_text), the
served tokenizer (open_clip's exact tokens, per-request errors), and NAME_text through the real tritonserver."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from vitserve import contract
from vitserve.contract import (
    EMBEDDINGS,
    TEXT_INPUT,
    TOKENS,
    TextParams,
    backbone_model_name,
    text_model_name,
    tokenizer_model_name,
)
from vitserve.errors import ConfigError
from vitserve.exporter.export import PARITY_COSINE
from vitserve.exporter.text import PARITY_SENTENCES
from vitserve.exporter.triton_models.tokenize import TextError, check_texts, tokenize_items

# Tokenizer equality corpus: real sentences, every script and emoji kind we could think of, whitespace and
# HTML that open_clip's cleaning rewrites, text far longer than the context (truncated ending with the end
# token), single characters. The empty string is refused by the served tokenizer (tested apart).
CORPUS = (
    *PARITY_SENTENCES,
    "a",
    ".",
    "🙂",
    "👩‍🚀 astronaut (ZWJ sequence), 🇫🇷 flag, 👍🏽 skin tone",
    "   leading and trailing spaces   ",
    "tabs\tand\nnew\r\nlines",
    " ",
    "&amp; &lt;html&gt; entities &quot;quoted&quot;",
    "UPPER lower MiXeD CaSe",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "안녕하세요 세계",
    "你好，世界！这是一张猫的照片。",
    "Ελληνικά κείμενα",
    "ﬁ ligature, combining e\u0301, full-width ＡＢＣ１２３",
    "mojibake: Ã©tÃ©",
    "numbers 3.14159 1,000,000 -42 1e-9",
    "https://example.com/path?query=1&x=y#frag",
    "x" * 4000,
    " ".join(["word"] * 200),
    "🚀" * 100,
    "a\u0000b",
)
NAME = "clip"  # conftest.CLIP_TEXT_MODEL


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def params() -> TextParams:
    return TextParams(tokenizer="ViT-B-32", context_length=77, logit_scale=100.0)


def test_tokenizer_equals_open_clip(open_clip_tokenizer, params):
    """The served model's tokenizing function gives open_clip's tokens, at the model's context length and
    at a short one (truncation ends with the end token)."""
    import open_clip

    served = open_clip.get_tokenizer(params.tokenizer, context_length=params.context_length)
    got = tokenize_items(served, [t.encode() for t in CORPUS], params)
    assert got.dtype == np.int64 and got.shape == (len(CORPUS), 77)
    np.testing.assert_array_equal(got, open_clip_tokenizer(list(CORPUS)).numpy())
    short = TextParams(tokenizer="ViT-B-32", context_length=16, logit_scale=100.0)
    got16 = tokenize_items(open_clip.get_tokenizer("ViT-B-32", context_length=16), list(CORPUS), short)
    np.testing.assert_array_equal(got16, open_clip_tokenizer(list(CORPUS), context_length=16).numpy())
    long_rows = got16[:, -1] != 0
    assert long_rows.sum() >= 3 and (got16[long_rows, -1] == open_clip_tokenizer.eot_token_id).all()


def test_bad_strings_are_refused_by_index_and_limit(params):
    with pytest.raises(TextError, match=r"text\[1\]: empty string"):
        check_texts([b"ok", b""], params)
    with pytest.raises(TextError, match=r"text\[2\]: not valid UTF-8 \(byte 0xff at offset 3\)"):
        check_texts([b"a", b"b", b"abc\xff"], params)
    with pytest.raises(TextError, match=r"text\[0\]: 4097 bytes, above the limit of 4096 UTF-8 bytes"):
        check_texts(["é" * 2048 + "x"], params)
    assert check_texts(["é" * 2048], params) == ["é" * 2048]  # 4096 bytes: at the limit, accepted
    with pytest.raises(TextError, match=r"257 strings in one request, above the limit of 256 \(max_texts\)"):
        check_texts(["a"] * 257, params)


def test_backbone_without_text_tower_is_refused(tmp_path):
    import yaml

    from vitserve.exporter.config import ModelSpec, load_models
    from vitserve.exporter.text import export_text

    with pytest.raises(ConfigError, match="DINOv2-S \\(dinov2\\) has no text tower"):
        export_text("DINOv2-S", tmp_path / "out", weights="random")
    assert not (tmp_path / "out").exists()
    config = tmp_path / "models.yaml"
    config.write_text(
        yaml.safe_dump(
            {"models": [{"name": "dino", "backbone": "NV-DINOv2", "weights": "random", "text": True}]}
        )
    )
    with pytest.raises(ConfigError, match="model dino text: NV-DINOv2 \\(nv-dinov2\\) has no text tower"):
        load_models(config)
    with pytest.raises(ConfigError, match="text='yes' must be true or false"):
        ModelSpec(name="m", backbone="ViT-B-32", text="yes")
    assert ModelSpec(name="m", backbone="ViT-B-32").text is False
    with pytest.raises(ConfigError, match="model m: text: true needs a cpu or onnxruntime kind"):
        ModelSpec(name="m", backbone="ViT-B-32", text=True, kinds=("tensorrt",))


# ------------------------------------------------------------------------------------------ the build


def _text_manifest(build) -> dict:
    return json.loads((build["artifacts"] / NAME / "text" / "fp32" / "manifest.json").read_text())


def test_text_export_parity_in_manifest(clip_text_build):
    """ViT-B-32 (random init): the text ONNX matches open_clip's encode_text on the sentences, at batch 1 and
    > 1 and on random token ids, cosine >= 0.99999, and the manifest says so with what the tokenizer needs."""
    m = _text_manifest(clip_text_build)
    assert m["tower"] == "text" and m["backbone"] == "ViT-B-32" and m["random_init"] is True
    assert m["input"] == {"name": TOKENS, "shape": [-1, 77], "dtype": "int64"}
    assert m["outputs"] == [EMBEDDINGS] and m["feature_dim"] == 512
    assert m["tokenizer"] == {"name": "ViT-B-32", "class": "SimpleTokenizer", "context_length": 77}
    assert m["parity"]["passed"] and m["parity"]["threshold_cosine"] == PARITY_COSINE
    assert len(m["parity"]["cases"]) == 3
    for case in m["parity"]["cases"].values():
        assert case["cosine_min"] >= PARITY_COSINE
    assert m["parity"]["sentences"] == list(PARITY_SENTENCES)
    assert set(m["files"]) == {contract.ONNX_FILE} and m["versions"]["open_clip_torch"]
    summary = clip_text_build["summary"]["models"][NAME]["text"]
    assert summary["parity_cosine_min"] >= PARITY_COSINE and summary["export"]["build_key"] == m["build_key"]


def test_text_export_reused_while_key_unchanged(clip_text_build):
    from vitserve.exporter.config import load_models
    from vitserve.exporter.text import text_export_stage

    spec = load_models(clip_text_build["config"])[0]
    folder = clip_text_build["artifacts"] / NAME
    before = (folder / "text" / "fp32" / contract.ONNX_FILE).stat().st_mtime_ns
    fp32, manifest = text_export_stage(spec, folder, random_init=True)
    assert (fp32 / contract.ONNX_FILE).stat().st_mtime_ns == before
    assert manifest["build_key"] == _text_manifest(clip_text_build)["build_key"]


def test_repository_has_the_text_models(clip_text_build):
    from vitserve.exporter.repository import read_config, read_params

    repo = clip_text_build["repository"]
    text, tok = text_model_name(NAME), tokenizer_model_name(NAME)
    backbone = backbone_model_name(text, "fp32", "cpu")
    assert (text, tok, backbone) == ("clip_text", "clip_text_tokenize", "clip_text_fp32_cpu")
    written = clip_text_build["summary"]["models"][NAME]["triton_models"]
    assert written[tok]["role"] == "text_tokenize"
    assert written[backbone] == {"role": "text_backbone", "precision": "fp32", "kind": "cpu"}
    assert written[text] == {"role": "text_ensemble", "backbone": backbone, "tokenizer": tok}
    assert written[NAME]["role"] == "ensemble"  # the image side is unchanged
    tok_cfg = read_config(repo / tok / "config.pbtxt")
    p = read_params(tok_cfg, TextParams)
    assert (p.tokenizer, p.context_length, p.max_texts) == ("ViT-B-32", 77, tok_cfg.max_batch_size)
    assert p.logit_scale == pytest.approx(_text_manifest(clip_text_build)["logit_scale"])
    assert (repo / tok / "1" / "model.py").is_file() and (repo / tok / "1" / "vitserve_contract.py").is_file()
    b_cfg = read_config(repo / backbone / "config.pbtxt")
    assert [i.name for i in b_cfg.input] == [TOKENS] and list(b_cfg.input[0].dims) == [77]
    ens = read_config(repo / text / "config.pbtxt")
    assert [s.model_name for s in ens.ensemble_scheduling.step] == [tok, backbone]
    assert [i.name for i in ens.input] == [TEXT_INPUT] and [o.name for o in ens.output] == [EMBEDDINGS]


# ------------------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def reference(clip_text_build):
    """open_clip's own text embeddings for CORPUS (the same random-init ViT-B-32 the build exported)."""
    import torch
    import torch.nn.functional as F

    from vitserve.exporter.backbones import create_backbone

    loaded = create_backbone("ViT-B-32", "random")
    with torch.inference_mode():
        emb = F.normalize(loaded.clip_model.encode_text(loaded.tokenizer(list(CORPUS))), dim=-1)
    return emb.numpy(), loaded.tokenizer(list(CORPUS)).numpy()


def _infer(url, model, texts, output):
    import tritonclient.http as httpclient

    arr = np.array([[t if isinstance(t, bytes) else t.encode()] for t in texts], dtype=object)
    inp = httpclient.InferInput(TEXT_INPUT, list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    client = httpclient.InferenceServerClient(url)
    try:
        return client.infer(model, [inp]).as_numpy(output)
    finally:
        client.close()  # an open keep-alive connection holds tritonserver's shutdown for 30 s


def _cosines(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.triton
def test_served_text_equals_open_clip(clip_text_server, reference):
    """Strings -> NAME_text: open_clip's encode_text (cosine >= 0.99999), unit norm; NAME_text_tokenize
    gives open_clip's exact tokens; a string's embedding is the same alone as in a batch."""
    ref_emb, ref_tokens = reference
    url = clip_text_server.http_url
    tokens = _infer(url, tokenizer_model_name(NAME), CORPUS, TOKENS)
    np.testing.assert_array_equal(tokens, ref_tokens)
    got = _infer(url, text_model_name(NAME), CORPUS, EMBEDDINGS)
    assert got.shape == (len(CORPUS), 512) and got.dtype == np.float32
    cos = _cosines(got, ref_emb)
    assert cos.min() >= PARITY_COSINE, cos.min()
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    alone = _infer(url, text_model_name(NAME), CORPUS[1:2], EMBEDDINGS)
    np.testing.assert_allclose(alone[0], got[1], atol=1e-5)


@pytest.mark.triton
def test_bad_string_fails_only_its_request(clip_text_server, reference):
    """Requests sent at once: the bad ones (empty, invalid UTF-8, too long, too many strings) fail with a
    message naming the index and the limit; the good ones get their embeddings."""
    from tritonclient.utils import InferenceServerException

    ref_emb, _ = reference
    url, model = clip_text_server.http_url, text_model_name(NAME)
    requests = [
        (CORPUS[:3], None),
        ([b"fine", b""], r"text\[1\]: empty string"),
        (CORPUS[3:6], None),
        ([b"\xc3\x28"], r"text\[0\]: not valid UTF-8 \(byte 0xc3 at offset 0\)"),
        ([b"ok", b"y" * 5000], r"text\[1\]: 5000 bytes, above the limit of 4096"),
        (CORPUS[6:8], None),
        (["a"] * 257, r"256"),
    ]

    def send(texts):
        try:
            return _infer(url, model, texts, EMBEDDINGS)
        except InferenceServerException as e:
            return e

    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(send, [t for t, _ in requests]))
    offset = {0: 0, 2: 3, 5: 6}
    for i, ((texts, error), got) in enumerate(zip(requests, results, strict=True)):
        if error is None:
            assert not isinstance(got, Exception), f"request {i} failed: {got}"
            assert _cosines(got, ref_emb[offset[i] : offset[i] + len(texts)]).min() >= PARITY_COSINE
        else:
            assert isinstance(got, InferenceServerException), f"request {i} was answered"
            assert re.search(error, got.message()), got.message()


# ------------------------------------------------------------------------------------- big backbones


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["ViT-L-14", "EVA02-L-14"])
def test_big_text_towers_parity(backbone, tmp_path):
    """ViT-L-14 and EVA02-L-14 (random init): the text ONNX matches open_clip's encode_text."""
    from vitserve.exporter.text import export_text

    m = export_text(backbone, tmp_path / "text", weights="random")
    cosines = [c["cosine_min"] for c in m["parity"]["cases"].values()]
    print(f"{backbone} text parity 1 - cosine_min {1 - min(cosines):.2e}, export {m['export_seconds']} s")
    assert min(cosines) >= PARITY_COSINE and m["feature_dim"] == 768


def test_text_models_on_gpu_kinds_route_to_onnxruntime(clip_text_build, tmp_path):
    """kinds [tensorrt, onnxruntime] (no TensorRT text plans yet): the text ensemble routes to the
    onnxruntime kind's FP32 text backbone, served by Triton's onnxruntime backend."""
    from vitserve.contract import Kind, Precision
    from vitserve.exporter.config import ModelSpec
    from vitserve.exporter.repository import Variant, read_config, write_text_models

    fp32 = clip_text_build["artifacts"] / NAME / "text" / "fp32" / contract.ONNX_FILE
    spec = ModelSpec(
        name="g", backbone="ViT-B-32", kinds=(Kind.TENSORRT, Kind.ONNXRUNTIME), text=True, preprocess="pillow"
    )
    params = TextParams(tokenizer="ViT-B-32", context_length=77, logit_scale=100.0)
    written = write_text_models(
        tmp_path, spec, {"feature_dim": 512}, params, [Variant(Precision.FP32, Kind.ONNXRUNTIME, fp32)]
    )
    assert written["g_text"]["backbone"] == "g_text_fp32_onnxruntime"
    cfg = read_config(tmp_path / "g_text_fp32_onnxruntime" / "config.pbtxt")
    assert (cfg.platform, cfg.max_batch_size) == ("onnxruntime_onnx", params.max_texts)
    assert (tmp_path / "g_text_fp32_onnxruntime" / "1" / contract.ONNX_FILE).is_file()
    with pytest.raises(ConfigError, match="no text variant can be served by its kinds"):
        write_text_models(tmp_path, spec, {"feature_dim": 512}, params, [])


@pytest.mark.slow
def test_text_fp16_and_int8_variants_pass_their_gates(clip_text_build, tmp_path):
    """The ViT-B-32 text tower in FP16 (AutoCast) and INT8 (explicit Q/DQ): scored against FP32 on the
    held-out sentences independently of this CPU's int8 kernels, gated like the image side, cached."""
    from vitserve.exporter.config import Gates
    from vitserve.exporter.text import make_text_variant

    fp32 = clip_text_build["artifacts"] / NAME / "text" / "fp32"
    for precision, floor in (("fp16", 0.9999), ("int8", 0.98)):
        report = make_text_variant(precision, fp32, tmp_path / precision, Gates())
        emb = report["fidelity"]["outputs"][EMBEDDINGS]
        print(f"text {precision}: {emb}, {report['seconds']} s, {report['gate']}")
        assert report["passed"] and report["gate"].startswith("PASS")
        assert report["fidelity"]["hardware_independent"] and emb["cosine_mean"] >= floor
        assert report["fidelity"]["sentences"] == len(PARITY_SENTENCES) + 4
        again = make_text_variant(precision, fp32, tmp_path / precision, Gates())
        assert again["key"] == report["key"] and again["seconds"] == report["seconds"]  # reused
    # the quantizers never touch the FP32 export (ModelOpt rewrites its input in place: it gets a copy)
    from vitserve.exporter.identity import sha256_file

    manifest = json.loads((fp32 / "manifest.json").read_text())
    assert sha256_file(fp32 / contract.ONNX_FILE) == manifest["files"][contract.ONNX_FILE]["sha256"]


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"tokenizer": "ViT-B-32", "context_length": 77}, "logit_scale"),
        ({"tokenizer": "ViT-B-32", "context_length": 0, "logit_scale": 100.0}, "context_length=0"),
        ({"tokenizer": "ViT-B-32", "context_length": 77, "logit_scale": 1, "max_strings": 9}, "max_strings"),
    ],
)
def test_served_tokenizer_validates_its_parameters_when_it_loads(params, needle):
    from vitserve.contract import TEXT_PARAM, ContractError
    from vitserve.exporter.triton_models.tokenize import TritonPythonModel

    config = {"name": "m_text_tokenize", "parameters": {TEXT_PARAM: {"string_value": json.dumps(params)}}}
    with pytest.raises(ContractError, match=needle):
        TritonPythonModel().initialize({"model_config": json.dumps(config)})


@pytest.mark.slow
def test_text_export_past_the_protobuf_limit_uses_one_external_data_file(tmp_path, monkeypatch):
    """The >2 GiB path (one model.onnx.data file), taken by a small model with the threshold lowered."""
    from vitserve.exporter import export
    from vitserve.exporter.text import export_text

    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 1024)
    m = export_text("ViT-B-32", tmp_path / "text", weights="random")
    assert m["external_data"] is True and set(m["files"]) == {contract.ONNX_FILE, export.EXTERNAL_DATA_NAME}
    assert min(c["cosine_min"] for c in m["parity"]["cases"].values()) >= PARITY_COSINE
