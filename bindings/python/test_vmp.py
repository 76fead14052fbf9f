#!/usr/bin/env python3
"""Tests of the VMP op of bindings/python/fep_kernels.py (VmpModel) against the real library,
on CPU tensors (and CUDA tensors when PyTorch and the library both see a GPU).

The references are pymdp 1.0.4's own outputs, recorded in tests/fixtures/vmp_pymdp.json (float64,
see tests/fixtures/VMP-CONVENTIONS.md): state inference (fpi) posteriors and free energies of
the T-maze and the two-factor model, sequence inference (vmp and mmp) over a window, policy
posteriors q(pi), and Dirichlet learning (qA, qB, qD). The library returns float32, so the
tolerance is 1e-5 (absolute, relative above 1).

Run from the repository root, after `cargo build` (no pytest needed):

    FEP_KERNELS_LIB=target/debug/libfep_kernels.so python3 bindings/python/test_vmp.py

It prints one line per test and closes with "N passed, N failed" (exit status 1 on a failure).
Needs PyTorch and NumPy; without them, it prints that it was skipped and exits 0.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _runner import skip_module  # noqa: E402

try:
    import numpy as np
    import torch
except ImportError as e:  # pragma: no cover
    skip_module("test_vmp.py", f"{e.name} is not installed")

import fep_kernels as fk
from _runner import run_tests

FIXTURE = os.path.join(HERE, "..", "..", "tests", "fixtures", "vmp_pymdp.json")
F32_TOL = 1e-5

with open(FIXTURE) as fh:
    DATA = json.load(fh)
MODELS = {m["name"]: m for m in DATA["models"]}

# ---- fixture decoding ----


def tensor(t):
    """A fixture tensor ({shape, data} or {shape, fill, index, data}) as a float64 array."""
    shape = t["shape"]
    if "fill" in t:
        a = np.full(int(np.prod(shape)), t["fill"], dtype=np.float64)
        a[np.asarray(t["index"], dtype=np.int64)] = t["data"]
        return a.reshape(shape)
    return np.asarray(t["data"], dtype=np.float64).reshape(shape)


def tensors(v):
    return [tensor(t) for t in v]


def model_of(fx, device="cpu", counts=True, **overrides):
    """A VmpModel of a fixture model, built from pymdp's layouts."""
    kwargs = dict(
        A=tensors(fx["A"]), B=tensors(fx["B"]), C=tensors(fx["C"]), D=tensors(fx["D"]),
        A_dependencies=fx["A_dependencies"],
        policies=tensor(fx["policies"]).astype(np.int32), E=tensor(fx["E"]),
    )
    if counts:
        kwargs.update(pA=tensors(fx["pA"]), pB=tensors(fx["pB"]), pD=tensors(fx["pD"]))
    kwargs.update(overrides)
    return fk.VmpModel(device=device, **kwargs)


def flat_beliefs(per_agent):
    """[agent][factor][state] (or [agent][t][factor][state]) as float32 rows over sum S."""
    def row(factors):
        return np.concatenate([np.asarray(f, dtype=np.float64) for f in factors])

    if isinstance(per_agent[0][0][0], list):
        a = np.stack([np.stack([row(step) for step in agent]) for agent in per_agent])
    else:
        a = np.stack([row(agent) for agent in per_agent])
    return torch.from_numpy(a)


def ints(v):
    return torch.tensor(v, dtype=torch.int64)


# ---- helpers ----


def assert_close(what, got, want, tol=F32_TOL):
    got = got.detach().cpu().to(torch.float64)
    want = torch.as_tensor(want, dtype=torch.float64)
    assert tuple(got.shape) == tuple(want.shape), (
        f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    )
    assert not torch.isnan(got).any(), f"{what}: NaN"
    err = ((got - want).abs() / want.abs().clamp(min=1.0)).max().item()
    assert err <= tol, f"{what}: error {err:.3e} > {tol:.1e}"


def expect_error(exc, fn, *needles):
    try:
        fn()
    except exc as e:
        msg = str(e)
        for n in needles:
            assert n in msg, f"{exc.__name__} message {msg!r} lacks {n!r}"
        return e
    raise AssertionError(f"expected {exc.__name__} containing {needles}")


# ---- tests against pymdp ----


def check_fpi(name, device="cpu", tol=F32_TOL):
    fx = MODELS[name]
    run = fx["fpi"]
    with model_of(fx, device) as model:
        obs = ints(run["obs"]).to(device)
        prior = flat_beliefs(run["prior"]).float().to(device)
        out = model.infer_states(obs, prior=prior, num_iter=run["num_iter"], trace=True)
        assert_close(f"{name} fpi qs", out["qs"], flat_beliefs(run["qs"]), tol)
        assert_close(f"{name} fpi vfe", out["vfe"], run["vfe"], tol)
        assert out["iterations"].tolist() == run["iterations_run"], out["iterations"]
        # F after each iteration: pymdp's run with K = k iterations.
        assert_close(f"{name} fpi vfe trace", out["vfe_trace"], run["per_iteration"]["vfe"], tol)
        # Distributional observations (pymdp's categorical_obs).
        cat = fx["fpi_categorical_obs"]
        dist = torch.from_numpy(np.stack([np.concatenate(a) for a in cat["obs_dist"]])).float()
        res = model.infer_states(dist.to(device), prior=flat_beliefs(cat["prior"]).float()
                                 .to(device), num_iter=cat["num_iter"])
        assert_close(f"{name} fpi categorical qs", res["qs"], flat_beliefs(cat["qs"]), tol)
        assert_close(f"{name} fpi categorical vfe", res["vfe"], cat["vfe"], tol)
        assert res["vfe_trace"] is None


def test_fpi_tmaze():
    check_fpi("tmaze")


def test_fpi_two_factor():
    check_fpi("two_factor")


def check_sequence(name, device="cpu", tol=F32_TOL):
    fx = MODELS[name]
    seq = fx["sequence"]
    assert seq["prior"] == "D"
    obs = ints(seq["obs"]).to(device)
    actions = ints(seq["actions"]).to(device)
    with model_of(fx, device) as model:
        for run in seq["runs"]:
            what = f"{name} {run['method']} tau {run['tau']}"
            out = model.infer_sequence(obs, actions, method=run["method"],
                                       num_iter=run["num_iter"], tau=run["tau"])
            assert_close(f"{what} qs", out["qs"], flat_beliefs(run["qs"]), tol)
            assert_close(f"{what} vfe_t", out["vfe_t"], run["vfe_t"], tol)
            assert_close(f"{what} vfe", out["vfe"], run["vfe"], tol)


def test_sequence_two_factor():
    check_sequence("two_factor")


def test_sequence_tmaze():
    check_sequence("tmaze")


def check_policies(name, device="cpu", tol=F32_TOL):
    fx = MODELS[name]
    pol = fx["policy"]
    qs = flat_beliefs(fx["fpi"]["qs"]).float().to(device)  # pol["qs_init"] is fpi.qs
    with model_of(fx, device) as model:
        out = model.infer_policies(qs, gamma=pol["gamma"])
        assert_close(f"{name} q_pi", out["q_pi"], pol["q_pi"], tol)
        assert_close(f"{name} G", out["g"], -torch.tensor(pol["neg_efe"]), tol)
        out = model.infer_policies(qs, gamma=pol["gamma"], param_info_gain=True)
        assert_close(f"{name} q_pi with novelty", out["q_pi"], pol["q_pi_with_novelty"], tol)


def test_policies_tmaze():
    check_policies("tmaze")


def test_policies_two_factor():
    check_policies("two_factor")


def check_learning(name, device="cpu", tol=F32_TOL):
    """pymdp keeps counts per agent: each agent's window goes into a model of its own."""
    fx = MODELS[name]
    lrn = fx["learning"]
    beliefs = flat_beliefs(lrn["beliefs"]).float()
    obs, actions = ints(lrn["obs"]), ints(lrn["actions"])
    for n in range(beliefs.shape[0]):
        with model_of(fx, device) as model:
            model.learn(obs[n:n + 1].to(device), beliefs[n:n + 1].contiguous().to(device),
                        actions[n:n + 1].to(device), lr_a=lrn["lr_pA"], lr_b=lrn["lr_pB"],
                        lr_d=lrn["lr_pD"])
            for m, want in enumerate(tensors(lrn["qA"][n])):
                assert_close(f"{name} agent {n} qA[{m}]", model.counts_a(m), want, tol)
            for f, want in enumerate(tensors(lrn["qB"][n])):
                assert_close(f"{name} agent {n} qB[{f}]", model.counts_b(f), want, tol)
            for f, want in enumerate(lrn["qD"][n]):
                assert_close(f"{name} agent {n} qD[{f}]", model.counts_d(f), want, tol)


def test_learning_tmaze():
    check_learning("tmaze")


def test_learning_two_factor():
    check_learning("two_factor")


# ---- the wrapper itself ----


def test_docstring_example_runs():
    doc = fk.VmpModel.__doc__
    code = doc[doc.index("Example"):].split("::", 1)[1]
    lines = [ln[8:] if ln.startswith(" " * 8) else ln.strip() for ln in code.splitlines()]
    exec(compile("\n".join(lines), "VmpModel.__doc__", "exec"), {"print": lambda *a: None})


def test_layouts_defaults_and_info():
    fx = MODELS["two_factor"]
    A, B = tensors(fx["A"]), tensors(fx["B"])
    # policies from policy_len (pymdp's construct_policies), counts absent, C and D defaulted.
    with fk.VmpModel(A, B, A_dependencies=fx["A_dependencies"], policy_len=2) as model:
        info = model.info()
        assert info == {"num_factors": 2, "num_modalities": 2, "belief_len": 7, "obs_len": 8,
                        "num_policies": 36, "policy_len": 2}, info
        assert np.array_equal(model.policies, tensor(fx["policies"]).astype(np.int32))
        assert model.counts_a(0) is None and model.counts_b(1) is None
        expect_error(ValueError, lambda: model.counts_a(2), "counts_a", "out of range")
        qs = model.infer_states(torch.tensor([[0, 1], [4, 2]]))["qs"]
        q0, q1 = model.factors(qs)
        assert q0.shape == (2, 4) and q1.shape == (2, 3)
        assert_close("factor sums", torch.stack([q0.sum(1), q1.sum(1)]), torch.ones(2, 2))
        # None entries of C and D are zeros and uniform.
        with fk.VmpModel(A, B, C=[None, np.zeros(3)], D=[None, np.ones(3) / 3],
                         A_dependencies=fx["A_dependencies"], policy_len=2) as same:
            qs2 = same.infer_states(torch.tensor([[0, 1], [4, 2]]))["qs"]
            assert torch.equal(qs, qs2)
    # int32 indices as is; a sequence posterior's last step for policies; out tensors reused.
    with model_of(fx) as model:
        obs = ints(fx["fpi"]["obs"]).int()
        out = {"qs": torch.empty(obs.shape[0], 7), "vfe": torch.empty(obs.shape[0]),
               "iterations": torch.empty(obs.shape[0], dtype=torch.int32)}
        res = model.infer_states(obs, out=out)
        assert all(res[k] is out[k] for k in out)
        seq = model.infer_sequence(ints(fx["sequence"]["obs"]), ints(fx["sequence"]["actions"]))
        a = model.infer_policies(seq["qs"])["q_pi"]
        b = model.infer_policies(seq["qs"][:, -1].contiguous())["q_pi"]
        assert torch.equal(a, b)
        # learning from one step ([N, sum S] beliefs, [N, M] observations), pD only
        before = model.counts_d(0).clone()
        model.learn(obs[:1], res["qs"][:1], lr_d=1.0)
        assert_close("pD after one step", model.counts_d(0) - before, res["qs"][0, :4])


def test_bad_arguments():
    fx = MODELS["two_factor"]
    A, B = tensors(fx["A"]), tensors(fx["B"])
    deps = fx["A_dependencies"]
    V = ValueError
    # Python-side shape checks of the model.
    expect_error(V, lambda: fk.VmpModel(A, B), "A[1]", "A_dependencies[1]", "[O, 4, 3]")
    expect_error(V, lambda: fk.VmpModel(A, B, A_dependencies=[[0, 1], [2]]), "A_dependencies[1]")
    expect_error(V, lambda: fk.VmpModel(A, [B[0][:, :3]], A_dependencies=deps), "B[0]")
    expect_error(V, lambda: fk.VmpModel(A, B, A_dependencies=deps, C=[np.zeros(4), None]), "C[0]",
                 "[5]")
    expect_error(V, lambda: fk.VmpModel(A, B, A_dependencies=deps, pA=[A[0]]), "pA", "2 entries")
    expect_error(V, lambda: fk.VmpModel(A, B, A_dependencies=deps, E=np.ones(3)), "E",
                 "without policies")
    expect_error(V, lambda: fk.VmpModel(A, B, A_dependencies=deps, policies=np.zeros((4, 2))),
                 "policies")
    # Values are the library's: FepError with FEP_ERR_INVALID_ARGUMENT and the field's name.
    bad_a = [A[0].copy(), A[1]]
    bad_a[0][0, 0, 0] += 0.5
    e = expect_error(fk.FepError, lambda: fk.VmpModel(bad_a, B, A_dependencies=deps), "`A[0]`",
                     "sums to")
    assert e.status == fk.FEP_ERR_INVALID_ARGUMENT and e.name == "FEP_ERR_INVALID_ARGUMENT"
    pol = tensor(fx["policies"]).astype(np.int32)
    pol[3, 1, 1] = 7
    # Integer indices are range-checked in Python, before they are narrowed to int32.
    expect_error(V, lambda: fk.VmpModel(A, B, A_dependencies=deps, policies=pol),
                 "policies[3, 1, 1] is 7", "factor 1 has 2 controls")
    expect_error(fk.FepError, lambda: fk.VmpModel(A, B, A_dependencies=deps, pB=[-b for b in B]),
                 "`pB[0]`")
    # The library's flat "element 5" of desc.a[1] is the user's A[1][...] multi-index.
    nan_a = [A[0], A[1].copy()]
    nan_a[1][2, 1] = np.nan
    idx = ", ".join(map(str, (2, 1) + (0,) * (nan_a[1].ndim - 2)))
    e = expect_error(fk.FepError, lambda: fk.VmpModel(nan_a, B, A_dependencies=deps), "`A[1]`",
                     f"A[1][{idx}] is NaN")
    assert "desc." not in str(e) and "element" not in str(e), str(e)
    expect_error(fk.FepError, lambda: fk.VmpModel(A, B, A_dependencies=deps,
                                                  D=[None, -np.ones(B[1].shape[0])]),
                 "D[1][0] is -1")

    with fk.VmpModel(A, B, A_dependencies=deps) as bare, model_of(fx) as model:
        obs = torch.tensor([[0, 1], [4, 2]])
        qs = model.infer_states(obs)["qs"]
        out = {"qs": torch.full((2, 7), float("nan"))}
        # Python checks: shapes, dtypes, devices.
        expect_error(V, lambda: model.infer_states(obs[:, :1]), "obs", "[*, 2]")
        expect_error(V, lambda: model.infer_states(obs.double()), "obs", "float64")
        expect_error(V, lambda: model.infer_states(obs, prior=qs.double()), "prior", "float32")
        expect_error(V, lambda: model.infer_states(obs, prior=qs[:1]), "prior", "[2, 7]")
        expect_error(V, lambda: model.infer_states(obs, num_iter=0), "num_iter")
        expect_error(V, lambda: model.infer_states(obs, out={"vfe_trace": torch.empty(2, 16)}),
                     "out", "vfe_trace")
        expect_error(V, lambda: model.infer_sequence(obs), "obs", "[*, *, 2]")
        expect_error(V, lambda: model.infer_sequence(obs[:, None], method="bp"), "method")
        expect_error(V, lambda: model.infer_sequence(
            torch.stack([obs, obs], 1), torch.zeros(2, 2, 2, dtype=torch.int64)), "actions",
            "[2, 1, 2]")
        expect_error(V, lambda: model.learn(obs, qs[:, :5]), "qs")
        # Library checks: FepError naming the argument, outputs untouched.
        bad = obs.clone()
        bad[1, 0] = 5
        expect_error(V, lambda: model.infer_states(bad, out=out), "obs[1, 0] is 5",
                     "modality 0 has 5 outcomes")
        assert torch.isnan(out["qs"]).all(), "outputs untouched on error"
        expect_error(fk.FepError, lambda: model.infer_states(obs, tol=-1.0), "tol")
        expect_error(fk.FepError, lambda: model.infer_sequence(obs[:, None], tau=0.0), "tau")
        expect_error(fk.FepError, lambda: model.infer_sequence(torch.stack([obs, obs], 1)),
                     "actions")
        expect_error(fk.FepError, lambda: model.infer_policies(qs, gamma=-1.0), "gamma")
        expect_error(fk.FepError, lambda: bare.infer_policies(qs), "policy")
        expect_error(fk.FepError, lambda: bare.learn(obs, qs, lr_a=0.5), "lr_a", "no counts")
        expect_error(fk.FepError, lambda: bare.infer_policies(qs[:, :7], param_info_gain=True),
                     "polic")
        before = model.counts_a(0)
        expect_error(fk.FepError, lambda: model.learn(obs, qs, lr_b=-1.0), "lr_b")
        assert torch.equal(model.counts_a(0), before), "counts untouched on error"
    expect_error(V, lambda: model.infer_states(obs), "closed")


def test_integer_indices_are_range_checked_before_narrowing():
    # Issue 21: int64 indices were narrowed to int32 first, so 2**32 + 1 was read as 1 and
    # infer_states returned exactly the result for observation 1.
    fx = MODELS["two_factor"]
    V = ValueError
    big = 2**32 + 1
    with model_of(fx) as model:
        obs = ints([[0, 1], [4, 2]])
        for bad, where in ((ints([[0, 1], [4, big]]), "obs[1, 1] is 4294967297"),
                           (ints([[0, 1], [-1, 2]]), "obs[1, 0] is -1"),
                           (ints([[0, 2**31]]), "obs[0, 1] is 2147483648"),
                           (torch.tensor([[0, 1], [4, 200]], dtype=torch.uint8),
                            "obs[1, 1] is 200")):
            for check in (True, False):  # on the CPU whatever check says
                expect_error(V, lambda: model.infer_states(bad, check=check), where,
                             "expected 0 <= obs <")
        once = ints([[big, 1]])
        expect_error(V, lambda: model.infer_states(once), "obs[0, 0] is 4294967297",
                     "modality 0 has 5 outcomes")
        seq = torch.stack([obs, obs], 1)  # [2, T = 2, M]
        acts = torch.zeros(2, 1, 2, dtype=torch.int64)
        model.infer_sequence(seq, actions=acts)
        acts[1, 0, 1] = big
        expect_error(V, lambda: model.infer_sequence(seq, actions=acts),
                     "actions[1, 0, 1] is 4294967297", "factor 1 has")
        seq_bad = seq.clone()
        seq_bad[0, 1, 0] = big
        expect_error(V, lambda: model.infer_sequence(seq_bad), "obs[0, 1, 0] is 4294967297")
        qs = model.infer_sequence(seq, actions=torch.zeros(2, 1, 2, dtype=torch.int64))["qs"]
        before = model.counts_b(0)
        expect_error(V, lambda: model.learn(seq, qs, actions=acts, lr_b=1.0), "actions[1, 0, 1]")
        expect_error(V, lambda: model.learn(seq_bad, qs, lr_a=1.0), "obs[0, 1, 0]")
        assert torch.equal(model.counts_b(0), before), "counts untouched on error"
        # In range, any integer dtype gives the same result as int32.
        want = model.infer_states(obs.to(torch.int32))["qs"]
        for dt in (torch.int64, torch.int16, torch.uint8):
            assert torch.equal(model.infer_states(obs.to(dt))["qs"], want), dt
        # Integer parameters: bools are not ints.
        expect_error(V, lambda: model.infer_states(obs, num_iter=True), "num_iter")
        expect_error(TypeError, lambda: model.infer_sequence(obs[:, None], num_iter=2.0),
                     "num_iter")
        expect_error(V, lambda: model.counts_a(True), "counts_a index")
        expect_error(V, lambda: model.infer_policies(qs, gamma=True), "gamma")
        expect_error(V, lambda: model.infer_states(obs[:0]), "obs: is empty (shape [0, 2])")
    # Policies given as int64 are checked before they are narrowed too.
    A, B = tensors(fx["A"]), tensors(fx["B"])
    pol = tensor(fx["policies"]).astype(np.int64)
    pol[2, 0, 1] = big
    expect_error(V, lambda: fk.VmpModel(A, B, A_dependencies=fx["A_dependencies"],
                                        policies=pol), "policies[2, 0, 1] is 4294967297")
    expect_error(V, lambda: fk.VmpModel(A, B, A_dependencies=[[0, 1], [True]]),
                 "A_dependencies[1][0]", "bool")
    expect_error(V, lambda: fk.VmpModel(A, B, A_dependencies=fx["A_dependencies"],
                                        policy_len=True), "policy_len")


def test_cuda_tensors():
    if not torch.cuda.is_available():
        return "SKIPPED: torch.cuda.is_available() is False"
    kind = "hip" if getattr(torch.version, "hip", None) else "cuda"
    if fk.device_count(kind) < 1:
        return f"SKIPPED: the library sees no {kind} device (built without the {kind} feature?)"
    # Mixed devices are rejected in Python.
    fx = MODELS["two_factor"]
    with model_of(fx, "cuda") as model:
        expect_error(ValueError, lambda: model.infer_states(torch.tensor([[0, 1]])), "obs",
                     "cuda")
    tol = 1e-4  # the GPU accumulates in float32
    for name in ("tmaze", "two_factor"):
        check_fpi(name, "cuda", tol)
        check_sequence(name, "cuda", tol)
        check_policies(name, "cuda", tol)
        check_learning(name, "cuda", tol)
    # On a side stream: the work is ordered on torch's current stream.
    s = torch.cuda.Stream()
    with model_of(fx, "cuda") as model, torch.cuda.stream(s):
        obs = ints(fx["fpi"]["obs"]).cuda()
        prior = flat_beliefs(fx["fpi"]["prior"]).float().cuda()
        qs = model.infer_states(obs, prior=prior, check=False)["qs"].cpu()
    assert_close("qs (side stream)", qs, flat_beliefs(fx["fpi"]["qs"]), tol)
    return None


def test_state_inference_without_b():
    # B=None: a model for state inference only; it gives pymdp's fpi numbers (fpi never reads
    # B), and what needs B says so.
    for name in ("tmaze", "two_factor"):
        fx = MODELS[name]
        run = fx["fpi"]
        obs = ints(run["obs"])
        prior = flat_beliefs(run["prior"]).float()
        num_states = [len(d) for d in tensors(fx["D"])]
        for kwargs in (dict(), dict(num_states=num_states)):
            with model_of(fx, counts=False, B=None, policies=None, E=None, **kwargs) as model:
                assert not model.has_b and model.num_states == num_states
                assert model.num_controls == [1] * len(num_states)
                out = model.infer_states(obs, prior=prior, num_iter=run["num_iter"])
                assert_close(f"{name} fpi without B", out["qs"], flat_beliefs(run["qs"]))
                assert_close(f"{name} fpi vfe without B", out["vfe"], run["vfe"])
                steps = 2
                sobs = obs[:, None, :].repeat(1, steps, 1).contiguous()
                acts = torch.zeros(obs.shape[0], steps - 1, len(num_states), dtype=torch.int32)
                expect_error(fk.FepError, lambda: model.infer_sequence(sobs, actions=acts),
                             "transition matrices B", "sequence inference")
    fx = MODELS["two_factor"]
    with model_of(fx, B=None, pB=None, policies=None, E=None, policy_len=1) as model:
        qs = model.infer_states(ints(fx["fpi"]["obs"]))["qs"]
        expect_error(fk.FepError, lambda: model.infer_policies(qs), "transition matrices B")
        post = qs[:, None, :].contiguous()
        obs1 = ints(fx["fpi"]["obs"])[:, None, :].contiguous()
        expect_error(fk.FepError, lambda: model.learn(obs1, post, lr_b=1.0), "lr_b")
        model.learn(obs1, post, lr_a=1.0)  # pA does not involve B
    expect_error(ValueError, lambda: model_of(fx, B=None), "pB", "without B")
    # num_states that A's shapes contradict
    expect_error(ValueError, lambda: model_of(fx, counts=False, B=None,
                                              num_states=[2, 2, 2]), "A[0]", "expected shape")
    expect_error(ValueError, lambda: model_of(fx, counts=False, num_states=[9, 9]),
                 "num_states", "disagrees")


def main():
    return run_tests(globals(), "test_vmp.py", f", pymdp fixtures {DATA['pymdp_version']}")


if __name__ == "__main__":
    sys.exit(main())
