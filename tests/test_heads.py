"""One backbone, many heads (models.yaml `heads:`): config, cache keys, repository layout, linear-probe
training, and (slow) the whole thing served by the real tritonserver against single-head exports."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from vitserve.errors import ConfigError
from vitserve.exporter.config import ModelSpec, NamedHead, load_models

ROOT = Path(__file__).resolve().parents[1]


def _spec(**kw) -> ModelSpec:
    return ModelSpec.from_dict({"name": "m", "backbone": "ViT-B-32", "weights": "random"} | kw)


# ------------------------------------------------------------------------------------------------ config


def test_heads_config_both_forms_and_paths_resolved(tmp_path):
    (tmp_path / "sub").mkdir()
    doc = {
        "models": [
            {
                "name": "m",
                "backbone": "ViT-B-32",
                "heads": {
                    "species": "linear:sub/species.pt",
                    "defects": {"head": "mlp:defects.pt", "labels": "sub/defects.txt"},
                    "tags": {"head": "zeroshot", "labels": ["cat", "dog"]},
                },
            }
        ]
    }
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(doc))
    for f in ("sub/species.pt", "defects.pt", "sub/defects.txt"):  # models.yaml's files must exist
        (tmp_path / f).write_bytes(b"")
    (spec,) = load_models(tmp_path / "models.yaml")
    heads = {h.name: h for h in spec.heads}
    assert heads["species"] == NamedHead("species", f"linear:{tmp_path / 'sub' / 'species.pt'}", None)
    assert heads["defects"].head == f"mlp:{tmp_path / 'defects.pt'}"
    assert heads["defects"].labels == str(tmp_path / "sub" / "defects.txt")
    assert heads["tags"] == NamedHead("tags", "zeroshot", ("cat", "dog"))
    # the repository manifest stores asdict(spec): it must read back (vitserve build-engines)
    from dataclasses import asdict

    again = ModelSpec.from_dict(json.loads(json.dumps(asdict(spec))))
    assert again.heads == spec.heads


@pytest.mark.parametrize(
    ("heads", "extra", "message"),
    [
        ({"a": "linear:x.pt"}, {"head": "zeroshot"}, "exclusive"),
        ({"a": "linear:x.pt"}, {"labels": ["x"]}, "exclusive"),
        ({"Species": "linear:x.pt"}, {}, "lowercase"),
        ({"a_b": "linear:x.pt"}, {}, "a-z, 0-9"),
        ({"preprocess": "linear:x.pt"}, {}, "reserved"),
        ({"a": "linear"}, {}, "needs its weights"),
        ({"a": "zeroshot"}, {}, "needs labels"),
        ({"a": "conv:x.pt"}, {}, "linear:FILE, mlp:FILE or zeroshot"),
        ({"a": {"head": "linear:x.pt", "lables": "l.txt"}}, {}, "unknown keys ['lables']"),
        ({"a": {"labels": "l.txt"}}, {}, "missing `head:`"),
        ({"a": 3}, {}, "expected linear:FILE"),
    ],
)
def test_bad_heads_are_refused_naming_model_and_head(heads, extra, message):
    with pytest.raises(ConfigError, match="model m") as e:
        _spec(heads=heads, **extra)
    assert message in str(e.value)


def test_head_ensemble_name_clashing_with_a_model_is_refused(tmp_path):
    doc = {
        "models": [
            {"name": "m", "backbone": "ViT-B-32", "heads": {"x": "linear:h.pt"}},
            {"name": "m_x", "backbone": "ViT-B-32"},
        ]
    }
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "h.pt").write_bytes(b"")  # models.yaml's files must exist
    with pytest.raises(ConfigError, match=r"\['m_x'\] is both a model and a head's ensemble"):
        load_models(tmp_path / "models.yaml")


def test_backbone_key_excludes_heads_and_head_key_only_its_own(tmp_path):
    from vitserve.exporter.multihead import head_key
    from vitserve.exporter.pipeline import export_key

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    one = _spec(heads={"x": f"linear:{a}"})
    two = _spec(heads={"x": f"linear:{a}", "y": f"mlp:{b}", "z": {"head": "zeroshot", "labels": ["q"]}})
    plain = _spec()
    k = export_key(one, "random", None)
    assert k == export_key(two, "random", None)  # adding heads: same backbone export, variants, engines
    assert k != export_key(plain, "random", None)  # a features-less backbone is another export
    hx = head_key(one.heads[0], None, k)
    assert hx == head_key(two.heads[0], None, k)  # other heads do not change a head
    a.write_bytes(b"a2")
    assert head_key(one.heads[0], None, k) != hx  # its own weights do
    assert head_key(one.heads[0], None, "other-backbone") != hx


def test_a_head_failing_a_variants_gate_withholds_that_variant(capsys):
    from vitserve.exporter.config import Precision
    from vitserve.exporter.multihead import _gate, gate_heads
    from vitserve.exporter.precision import check_gate

    spec = _spec(heads={"x": "linear:/x.pt", "y": "linear:/y.pt"})

    def report(precision, emb, logits):
        r = {"outputs": {"embeddings": {"cosine_mean": emb}}}
        r["outputs"]["logits"] = {"cosine_min": logits, "cosine_mean": logits, "top1_agreement": 1.0}
        r["outputs"]["probs"] = {"cosine_min": logits}
        r["passed"], r["gate"] = _gate(precision, r, spec.gates, check_gate)
        return r

    fidelity = {
        "fp16": {"x": report(Precision.FP16, 0.9999, 0.9999), "y": report(Precision.FP16, 0.9999, 0.9999)},
        "cpu-int8": {
            "x": report(Precision.CPU_INT8, 0.999, 0.999),
            "y": report(Precision.CPU_INT8, 0.999, 0.99),
        },
    }
    assert fidelity["cpu-int8"]["y"]["gate"].endswith("head logits mean cosine 0.990000 < 0.995")
    assert gate_heads(spec, fidelity) == {Precision.CPU_INT8}
    assert "cpu-int8 is NOT published: head(s) failed its gate" in capsys.readouterr().out
    forced = _spec(heads={"x": "linear:/x.pt", "y": "linear:/y.pt"}, force=True)
    assert gate_heads(forced, fidelity) == set()


def test_heads_are_gated_on_every_cpu_int8_flavour(tmp_path, capsys):
    """Every cpu-int8 flavour that can serve (vnni on VNNI hosts, the portable avx2 everywhere) is run
    with the heads before it is published, each flavour's arithmetic computed independently of this host
    (exact integer matmuls). A flavour a head fails leaves the variant's published flavours, with the
    reason printed and recorded; without its portable flavour the variant is withheld. (The flavour made
    to fail here is another model's quantization put in its place, so no verdict depends on the CPU.)"""
    import shutil

    from tiny_models import tiny_backbone, tiny_head

    from vitserve.exporter.config import Precision
    from vitserve.exporter.multihead import gate_heads, head_fidelity
    from vitserve.exporter.pipeline import _flavour_files
    from vitserve.exporter.precision import make_variant

    spec = _spec(heads={"x": "linear:/x.pt"}, precisions=["fp32", "cpu-int8"], calibration={"num_images": 4})
    model_dir = tmp_path / "m"
    tiny_backbone(model_dir / "fp32", seed=0)
    tiny_backbone(tmp_path / "other" / "fp32", seed=1)
    variant = make_variant(Precision.CPU_INT8, model_dir / "fp32", model_dir / "cpu-int8", spec, eval_count=8)
    make_variant(
        Precision.CPU_INT8, tmp_path / "other" / "fp32", tmp_path / "other" / "cpu-int8", spec, eval_count=8
    )
    assert variant["passed"] and variant["published_flavours"] == ["vnni", "avx2"]
    heads = {"x": {"dir": tiny_head(tmp_path / "heads" / "x").parent}}
    files = {k: model_dir / "cpu-int8" / f["file"] for k, f in variant["flavours"].items()}

    def gated(broken: str | None, force: bool = False):
        for k, f in files.items():  # the flavour `broken` computes another model
            shutil.copyfile(
                (tmp_path / "other" if k == broken else model_dir) / "cpu-int8" / f.name, f.with_suffix(".x")
            )
        scored = {k: f.with_suffix(".x") for k, f in files.items()}
        fid = head_fidelity(spec, heads, model_dir / "fp32", {Precision.CPU_INT8: scored}, model_dir)
        report = json.loads(json.dumps(variant))
        refused = gate_heads(_spec(heads={"x": "linear:/x.pt"}, force=force), fid, {"cpu-int8": report})
        return fid["cpu-int8"]["x"], report, refused

    x, report, refused = gated(None)
    assert set(x["flavours"]) == {"vnni", "avx2"} and x["passed"] and not refused
    assert report["published_flavours"] == ["vnni", "avx2"]

    x, report, refused = gated("vnni")
    assert not x["flavours"]["vnni"]["passed"] and x["flavours"]["avx2"]["passed"] and not x["passed"]
    assert not refused and report["published_flavours"] == ["avx2"]  # served on every host by avx2
    assert report["flavours"]["vnni"]["withheld"].startswith("head(s) failed its gate: {'x': 'FAIL")
    assert "cpu-int8 flavour 'vnni' is NOT published: head(s) failed its gate" in capsys.readouterr().out
    assert [k for k, _ in _flavour_files(report, model_dir / "cpu-int8")] == ["avx2", "probe"]

    x, report, refused = gated("avx2")
    assert refused == {Precision.CPU_INT8} and report["published_flavours"] == ["vnni"]
    assert (
        "cpu-int8 is NOT published: flavours left after the heads' gates: ['vnni']" in capsys.readouterr().out
    )

    _, report, refused = gated("avx2", force=True)
    assert not refused and report["published_flavours"] == ["vnni", "avx2"]


# -------------------------------------------------------------------------------------------- repository


def test_head_models_and_ensembles_configs(tmp_path):
    from vitserve.exporter.multihead import head_config, head_model_name, write_heads
    from vitserve.exporter.repository import read_config

    spec = _spec(
        heads={"sp": "linear:/x.pt", "tags": {"head": "zeroshot", "labels": ["a", "b", "c"]}},
        profile={"min": 1, "opt": 4, "max": 8},
    )
    recs = {}
    for name, classes in (("sp", 10), ("tags", 3)):
        d = tmp_path / "art" / name
        d.mkdir(parents=True)
        (d / "model.onnx").write_bytes(b"onnx")
        (d / "labels.txt").write_text("\n".join(f"{name}{i}" for i in range(classes)) + "\n")
        recs[name] = {"dir": d, "num_classes": classes, "feature_dim": 512, "kind": "linear"}
    repo = tmp_path / "repo"
    written = write_heads(repo, spec, recs, "m_fp32_cpu", 512)
    assert set(written) == {"m", "m_sp", "m_sp_head", "m_tags", "m_tags_head"}
    head = read_config(repo / "m_sp_head" / "config.pbtxt")
    assert head == head_config(head_model_name("m", "sp"), spec, recs["sp"])
    assert head.backend == "python" and [i.name for i in head.input] == ["features"]
    assert [(o.name, list(o.dims), o.label_filename) for o in head.output] == [
        ("logits", [10], ""),
        ("probs", [10], "labels.txt"),
    ]
    assert head.dynamic_batching.max_queue_delay_microseconds == 0
    assert json.loads(head.parameters["onnx_cpu"].string_value)["cpu_threads"] == 1
    assert (repo / "m_sp_head" / "1" / "model.py").is_file()
    one = read_config(repo / "m_tags" / "config.pbtxt")
    assert [s.model_name for s in one.ensemble_scheduling.step] == [
        "m_preprocess",
        "m_fp32_cpu",
        "m_tags_head",
    ]
    assert [o.name for o in one.output] == ["logits", "probs"]
    assert dict(one.ensemble_scheduling.step[1].output_map) == {"features": "features"}
    every = read_config(repo / "m" / "config.pbtxt")
    assert [s.model_name for s in every.ensemble_scheduling.step] == [
        "m_preprocess",
        "m_fp32_cpu",
        "m_sp_head",
        "m_tags_head",
    ]
    assert [(o.name, o.label_filename) for o in every.output] == [
        ("embeddings", ""),
        ("sp_logits", ""),
        ("sp_probs", "labels_sp.txt"),
        ("tags_logits", ""),
        ("tags_probs", "labels_tags.txt"),
    ]
    assert (repo / "m" / "labels_tags.txt").read_text() == "tags0\ntags1\ntags2\n"
    gpu = head_config("g", _spec(heads={"sp": "linear:/x.pt"}, kinds=["tensorrt"]), recs["sp"])
    assert gpu.platform == "onnxruntime_onnx" and gpu.instance_group[0].kind == gpu.instance_group[0].KIND_GPU


# ------------------------------------------------------------------------------------------ train-head


def test_logistic_regression_learns_separable_classes_and_split_is_stratified():
    from vitserve.exporter.train_head import accuracy, fit_logistic, split

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 16)) * 4
    y = np.repeat(np.arange(3), 40)
    x = (centers[y] + rng.standard_normal((len(y), 16)) + 50).astype(np.float32)  # offset: not centred
    train, test = split(y, 0.25, seed=1)
    assert set(train).isdisjoint(test) and len(train) + len(test) == len(y)
    assert np.bincount(y[test]).tolist() == [10, 10, 10]
    w, b = fit_logistic(x[train], y[train], 3)
    assert w.shape == (3, 16) and b.shape == (3,)
    assert accuracy(w, b, x[test], y[test]) >= 0.95
    # labels permuted at random: nothing to learn, held-out accuracy near chance
    w, b = fit_logistic(x[train], rng.permutation(y[train]), 3)
    assert accuracy(w, b, x[test], y[test]) < 0.7


def test_train_head_refuses_unusable_image_folders(tmp_path):
    from vitserve.exporter.train_head import find_images, split

    with pytest.raises(ConfigError, match="not a folder"):
        find_images(tmp_path / "missing")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="at least 2"):
        find_images(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.png").write_bytes(b"x")
    (tmp_path / "other" / "c.png").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"only \(1\)"):
        find_images(tmp_path)
    with pytest.raises(ConfigError, match="--holdout"):
        split(np.array([0, 0, 1, 1]), 1.5, 0)


# ------------------------------------------------------------------------------------- served (slow)

HEAD_NAMES = ("species", "defects", "tags")
TAGS = ["astronaut", "cat", "cup of coffee", "rocket"]


def _write_heads(d: Path) -> dict[str, dict]:
    import torch

    g = torch.Generator().manual_seed(1)
    torch.save(
        {"fc.weight": torch.randn(6, 512, generator=g) * 0.5, "fc.bias": torch.randn(6, generator=g)},
        d / "species.pt",
    )
    torch.save(
        {
            "fc1.weight": torch.randn(32, 512, generator=g) * 0.2,
            "fc1.bias": torch.zeros(32),
            "fc2.weight": torch.randn(4, 32, generator=g) * 0.5,
            "fc2.bias": torch.zeros(4),
        },
        d / "defects.pt",
    )
    (d / "species.txt").write_text("\n".join(f"species-{i}" for i in range(6)) + "\n")
    (d / "defects.txt").write_text("crack\ndent\nrust\nscratch\n")
    return {
        "species": {"head": "linear:species.pt", "labels": "species.txt"},
        "defects": {"head": "mlp:defects.pt", "labels": "defects.txt"},
        "tags": {"head": "zeroshot", "labels": TAGS},
    }


def _config(root: Path, heads: dict) -> Path:
    model = {
        "name": "mh",
        "backbone": "ViT-B-32",
        "weights": "random",
        "heads": heads,
        # the CPU serves FP32, so served heads compare to single-head FP32 exports at 0.99999; fp16 and
        # cpu-int8 are built so that every head is gated through them
        "precisions": ["fp32", "fp16", "cpu-int8"],
        "cpu_precisions": ["fp32"],
        "kinds": ["cpu"],
        "profile": {"min": 1, "opt": 4, "max": 8},
        "dynamic_batching": {"preferred_batch_sizes": [4, 8], "max_queue_delay_us": 5000},
        "calibration": {"num_images": 8},
    }
    path = root / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [model]}))
    return path


@pytest.fixture(scope="module")
def heads_build(tmp_path_factory):
    """ViT-B-32 (random init) with linear, mlp and zeroshot heads through `make engines`, and the three
    single-head exports (the same backbone and head exported as one model) as references."""
    from vitserve.exporter.export import export_model
    from vitserve.exporter.pipeline import build_all

    root = tmp_path_factory.mktemp("heads")
    heads = _write_heads(root)
    config = _config(root, heads)
    summary = build_all(config, root / "repo", root / "artifacts", random_init=True)
    refs = {}
    for name, h in heads.items():
        labels = h["labels"]
        if isinstance(labels, list):
            (root / f"{name}.txt").write_text("\n".join(labels) + "\n")
            labels = f"{name}.txt"
        kind, _, file = h["head"].partition(":")
        head = f"{kind}:{root / file}" if file else kind
        export_model("ViT-B-32", root / "single" / name, weights="random", head=head, labels=root / labels)
        refs[name] = root / "single" / name / "model.onnx"
    return {"root": root, "config": config, "heads": heads, "summary": summary, "refs": refs}


@pytest.fixture(scope="module")
def heads_server(heads_build):
    from vitserve.server import TritonServer

    with TritonServer(heads_build["root"] / "repo", log_path=heads_build["root"] / "server.log") as s:
        yield s


def _jpegs(count: int) -> list[bytes]:
    from vitserve.exporter.samples import eval_photos

    out = []
    for _, im in eval_photos()[:count]:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def _infer(client, model: str, images: list[bytes]):
    import tritonclient.http as httpclient

    arr = np.array(images, dtype=object).reshape(-1, 1)
    inp = httpclient.InferInput("image", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    return client.infer(model, [inp])


def _cos_min(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


@pytest.mark.slow
@pytest.mark.triton
def test_every_head_served_equals_its_single_head_export(heads_build, heads_server):
    """Each head through the shared backbone, served (ensembles mh_HEAD and mh), against the single-model
    export of the backbone with that head, on the same preprocessed photos (mh_preprocess's output)."""
    import tritonclient.http as httpclient

    from vitserve.client import VitClient
    from vitserve.exporter import onnxrt

    summary = heads_build["summary"]["models"]["mh"]
    roles = {n: t["role"] for n, t in summary["triton_models"].items()}
    assert roles == {
        "mh_preprocess": "preprocess",
        "mh_fp32_cpu": "backbone",
        "mh": "ensemble",
        **{f"mh_{h}": "ensemble" for h in HEAD_NAMES},
        **{f"mh_{h}_head": "head" for h in HEAD_NAMES},
    }
    # every head gated through every other variant of the backbone (values depend on the CPU: not asserted)
    assert set(summary["heads"]) == set(HEAD_NAMES)
    for h in HEAD_NAMES:
        assert set(summary["heads"][h]["fidelity"]) == {"fp16", "cpu-int8"}
        for report in summary["heads"][h]["fidelity"].values():
            assert report["gate"].startswith("PASS" if report["passed"] else "FAIL")

    images = _jpegs(5)
    client = httpclient.InferenceServerClient(heads_server.http_url)
    pixels = _infer(client, "mh_preprocess", images).as_numpy("pixel_values")
    every = _infer(client, "mh", images)
    emb = every.as_numpy("embeddings")
    with VitClient(heads_server.grpc_url, "mh") as vc:
        for h in HEAD_NAMES:
            ref = onnxrt.run(onnxrt.cpu_session(heads_build["refs"][h]), pixels)
            one = _infer(client, f"mh_{h}", images)
            for out in ("logits", "probs"):
                assert _cos_min(one.as_numpy(out), ref[out]) >= 0.99999, (h, out)
                assert _cos_min(every.as_numpy(f"{h}_{out}"), ref[out]) >= 0.99999, (h, out)
            assert _cos_min(emb, ref["embeddings"]) >= 0.99999
            labels = (heads_build["root"] / "single" / h / "labels.txt").read_text().split("\n")
            top = vc.classify(images, top_k=1, head=h)
            assert [p[0][0] for p in top.predictions] == [labels[i] for i in ref["probs"].argmax(1)]
        from vitserve.errors import ClientError

        with pytest.raises(ClientError, match="several heads: pass head= one of defects, species, tags"):
            vc.classify(images[:1])
        with pytest.raises(ClientError, match="no head 'nope'; its heads are: defects, species, tags"):
            vc.classify(images[:1], head="nope")


@pytest.mark.slow
def test_train_head_then_add_it_as_a_fourth_head_without_reexporting(heads_build, tmp_path, capsys):
    """`vitserve train-head` on the built backbone's features, then the trained head added as a fourth
    head: the backbone's export and variants are reused (files untouched), the three heads too."""
    import torch

    from vitserve.cli import main
    from vitserve.exporter.pipeline import build_all
    from vitserve.exporter.samples import eval_views

    root, config = heads_build["root"], heads_build["config"]
    art = root / "artifacts" / "mh"
    images = tmp_path / "images"
    sources = ("astronaut", "chelsea", "coffee")
    for name, im in eval_views(40):
        src = next((s for s in sources if name.startswith(s)), None)
        if src:
            (images / src).mkdir(parents=True, exist_ok=True)
            im.convert("RGB").save(images / src / f"{name}.jpg")
    out = tmp_path / "probe.pt"
    argv = ["train-head", "--config", str(config), "--artifacts", str(root / "artifacts"), "--model", "mh"]
    argv += ["--images", str(images), "--out", str(out), "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    text = capsys.readouterr().out
    assert "RANDOM-INIT" in text and "mechanics" in text
    assert report["classes"] == list(sources) and report["images"] == 15 and report["held_out_images"] == 3
    assert not report["features_cached"]
    # the reported held-out accuracy is the saved head's, on the cached features and the same split
    from vitserve.exporter.train_head import accuracy, split

    sd = torch.load(out, weights_only=True)
    feats = np.load(report["features_cache"])["features"]
    y = np.repeat(np.arange(3), 5)
    _, test = split(y, 0.2, 0)
    assert (
        accuracy(sd["weight"].numpy(), sd["bias"].numpy(), feats[test], y[test])
        == report["held_out_accuracy"]
    )
    assert main(argv) == 0
    assert json.loads((tmp_path / "r.json").read_text())["features_cached"]

    def stamps():
        files = [*(art / "fp32").iterdir(), *(art / "fp16").iterdir(), *(art / "cpu-int8").iterdir()]
        files += [art / "heads" / h / "model.onnx" for h in HEAD_NAMES]
        return {str(f): os.stat(f).st_mtime_ns for f in files if f.is_file()}

    before = stamps()
    doc = yaml.safe_load(config.read_text())
    doc["models"][0]["heads"]["probe"] = {"head": f"linear:{out}", "labels": report["labels"]}
    config.write_text(yaml.safe_dump(doc))
    summary = build_all(config, root / "repo4", root / "artifacts", random_init=True)["models"]["mh"]
    assert stamps() == before  # nothing of the backbone (nor of the other heads) was rebuilt
    assert summary["export"]["build_key"] == heads_build["summary"]["models"]["mh"]["export"]["build_key"]
    assert {h: r["cached"] for h, r in summary["heads"].items()} == {
        "species": True,
        "defects": True,
        "tags": True,
        "probe": False,
    }
    assert summary["triton_models"]["mh_probe"]["role"] == "ensemble"
    probe_labels = (root / "repo4" / "mh" / "labels_probe.txt").read_text().split()
    assert probe_labels == list(sources)
