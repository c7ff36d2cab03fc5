"""`ojbkq quantize-layer` (docs/interfaces.md): files in, files out, errors with exit status 2."""
import numpy as np
import pytest

from ojbkq_core.cli import main, parse_value


@pytest.fixture
def layer_files(tmp_path):
    rng = np.random.default_rng(0)
    n, m, N = 32, 12, 256
    A = rng.normal(size=(n, n)) * np.logspace(0, -2, n)
    X = rng.normal(size=(N, n)) @ A
    Xfp = X + 0.2 * rng.normal(size=(N, n)) @ A
    W = rng.normal(size=(m, n))
    for name, arr in (("W", W), ("X", X), ("XFP", Xfp)):
        np.save(tmp_path / f"{name}.npy", arr.astype(np.float32))
    return tmp_path, W.astype(np.float32), X.astype(np.float32), Xfp.astype(np.float32)


def test_parse_value_order():
    assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("0.5") == 0.5
    assert parse_value("true") is True and parse_value("False") is False
    assert parse_value("uniform:0.4:0.8") == "uniform:0.4:0.8"


@pytest.mark.parametrize("objective,oparams,decoder,params", [
    ("symmetric", [], "babai", []),
    ("regularized", ["alpha=0.5"], "successive", []),
    ("jta", ["mu=0.6", "lam=0.6"], "klein", ["k=8"]),
    ("asymmetric", [], "beam", ["width=3", "expand=2"]),
])
def test_quantize_layer_writes_the_interface(layer_files, objective, oparams, decoder, params):
    d, W, X, Xfp = layer_files
    out = d / "out.npz"
    argv = ["quantize-layer", "--weight", str(d / "W.npy"), "--inputs", str(d / "X.npy"), "--fp-inputs",
            str(d / "XFP.npy"), "-o", str(out), "--bits", "3", "--group-size", "8", "--act-order",
            "--objective", objective, "--decoder", decoder, "--seed", "1"]
    for p in oparams:
        argv += ["--objective-param", p]
    for p in params:
        argv += ["--param", p]
    assert main(argv) == 0
    z = np.load(out)
    assert set(z.files) == {"qweight", "codes", "scales", "zeros", "g_idx", "loss"}
    m, n = W.shape
    assert z["qweight"].dtype == np.float32 and z["qweight"].shape == (m, n)
    assert z["codes"].shape == (m, n) and z["codes"].min() >= 0 and z["codes"].max() <= 7
    assert z["scales"].shape == z["zeros"].shape == (m, n // 8)
    assert z["g_idx"].shape == (n,) and sorted(np.bincount(z["g_idx"])) == [8] * (n // 8)
    g = z["g_idx"]
    assert np.allclose(z["scales"][:, g] * (z["codes"] - z["zeros"][:, g]), z["qweight"], atol=1e-6)
    # the loss is the objective computed directly from the inputs
    Q = z["qweight"].astype(np.float64)
    W64, X64, F64 = W.astype(np.float64), X.astype(np.float64), Xfp.astype(np.float64)
    terms = {"symmetric": [(1, 0, 0)], "asymmetric": [(1, 1, 0)], "regularized": [(1, 0.5, 0)],
             "jta": [(0.6, 0.6, 0), (0.4, 1, 1)]}[objective]
    want = sum(w * (((a * F64 + (1 - a) * X64) @ W64.T - (b * F64 + (1 - b) * X64) @ Q.T) ** 2).sum() / len(X)
               for w, a, b in terms)
    assert float(z["loss"]) == pytest.approx(want, rel=1e-6)


def test_same_seed_same_output(layer_files):
    d, *_ = layer_files
    outs = []
    for i in range(2):
        out = d / f"o{i}.npz"
        assert main(["quantize-layer", "--weight", str(d / "W.npy"), "--inputs", str(d / "X.npy"), "-o", str(out),
                     "--decoder", "klein", "--param", "k=8", "--seed", "3"]) == 0
        outs.append(np.load(out)["codes"])
    assert np.array_equal(*outs)


@pytest.mark.parametrize("change,needle", [
    (lambda d: ["--weight", str(d / "missing.npy")], "missing.npy: no such file"),
    (lambda d: ["--objective", "nope"], "unknown objective 'nope'"),
    (lambda d: ["--decoder", "nope"], "unknown decoder 'nope'"),
    (lambda d: ["--param", "k"], "expected KEY=VALUE"),
    (lambda d: ["--decoder", "klein", "--param", "kk=3"], "unknown parameter(s) kk"),
    (lambda d: ["--bits", "9"], "bits"),
    (lambda d: ["--objective", "asymmetric"], "--fp-inputs"),
    (lambda d: ["--objective", "regularized", "--objective-param", "alpha=2"], "alpha"),
    (lambda d: ["--inputs", str(d / "Xbad.npy")], "columns"),
    (lambda d: ["--device", "tpu"], "--device"),
])
def test_bad_input_exits_2_with_one_line(layer_files, capsys, change, needle):
    d, *_ = layer_files
    np.save(d / "Xbad.npy", np.zeros((10, 5), dtype=np.float32))
    base = {"--weight": str(d / "W.npy"), "--inputs": str(d / "X.npy"), "-o": str(d / "o.npz")}
    extra = change(d)
    for k in list(base):
        if k in extra:
            del base[k]
    argv = ["quantize-layer"] + [x for kv in base.items() for x in kv] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not (d / "o.npz").exists()
