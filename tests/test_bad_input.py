"""Bad input at the public boundary: each case names the argument the user passed (message starts with it or
quotes it), raises TypeError / ValueError and leaves the caller's tensors alone. Complements
test_validation.py (the check helpers and the common tensor / coefficient forms, not repeated here)."""
import math
import types

import pytest
import torch

import fastat
from fastat import cli, schedules
from fastat.training import GraphedStep, p2_radius, p2_weight

B = 4
TABLE = schedules.ddpm_linear_alphas_cumprod(100)
X0 = torch.randn(B, 2, 3, 3)
T = torch.tensor([0, 10, 50, 99])


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 1)

    def forward(self, x, t, **kw):
        return self.conv(x)


def raises(exc, match, fn):
    """fn() raises `exc` matching `match` without touching X0 / T; returns the global generator's state from before
    the call (errors about a model's output come after the call's draws, argument errors before them)."""
    state, x0, t = torch.get_rng_state(), X0.clone(), T.clone()
    with pytest.raises(exc, match=match):
        fn()
    assert torch.equal(X0, x0) and torch.equal(T, t)
    return state


def dal(**kw):
    model = kw.pop("model") if "model" in kw else Net()
    args = dict(x0=X0, timesteps=T, alphas_cumprod=TABLE)
    args.update(kw)
    return fastat.diffusion_adv_loss(model, args.pop("x0"), **args)


def cal(**kw):
    args = dict(model=lambda x, s: 0.5 * x, target_model=None, x0=X0)
    args.update(kw)
    return fastat.consistency_adv_loss(args.pop("model"), args.pop("target_model"), args.pop("x0"), **args)


# ----------------------------------------------------------------------------------------------- ops


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])  # triton: refused before any kernel runs
def test_op_flags_and_generators(backend):
    if not fastat.backend_status(backend)[0]:
        pytest.skip(f"{backend} unavailable")
    d, g = torch.zeros(B, 64), torch.randn(B, 64)
    with fastat.use_backend(backend):
        for bad in ("no", None, 2, torch.tensor(True)):  # bool("no") would silently normalise
            with pytest.raises(TypeError, match="^normalize must be True or False"):
                fastat.pgd_step(d, g, 0.1, 1.0, normalize=bad)
        for bad in ("gen", 3):
            with pytest.raises(TypeError, match="^generator must be a torch.Generator"):
                fastat.random_perturbation(d, 0.5, generator=bad)
        with pytest.raises(TypeError, match="^detach_anchor must be True or False"):
            fastat.equivariance_regularizer(g, g, d, detach_anchor="no")
        # a bad radius tensor is refused before the seed draw, also where the kernel checks values itself
        state = torch.get_rng_state()
        with pytest.raises(ValueError, match="^radius must be >= 0"):
            fastat.random_perturbation(d, torch.tensor([0.1, -0.1, 0.1, 0.1]))
        assert torch.equal(torch.get_rng_state(), state)


def test_rms_radius_checks_its_arguments():
    assert fastat.rms_radius(0.1, X0) == pytest.approx(0.1 * math.sqrt(18))
    for bad, exc, match in [([1.0], TypeError, "^like must be a torch.Tensor"), (None, TypeError, "^like must"),
                            (torch.tensor(1.0), ValueError, "^like must have a leading batch")]:
        with pytest.raises(exc, match=match):
            fastat.rms_radius(0.1, bad)
    for bad, exc in [("0.1", TypeError), (True, TypeError), (-1.0, ValueError), (math.nan, ValueError),
                     (torch.ones(B, dtype=torch.long), TypeError)]:
        with pytest.raises(exc, match="^r must"):
            fastat.rms_radius(bad, X0)


def test_equivariant_mse_checks_an_unused_sigma_tensor():
    with pytest.raises(ValueError, match="^sigma must be finite"):
        fastat.equivariant_mse(X0, X0, None, torch.tensor([1.0, math.nan, 1.0, 1.0]), "original")


@pytest.mark.parametrize("table,match", [
    (torch.full((100,), math.nan, dtype=torch.float64), r"alphas_cumprod must hold finite values in \[0, 1\]"),
    (torch.full((100,), 1.5, dtype=torch.float64), r"alphas_cumprod must hold finite values in \[0, 1\]"),
    (torch.empty(0, dtype=torch.float64), "alphas_cumprod must hold at least one timestep"),
    (torch.empty(100, device="meta"), "alphas_cumprod is on the meta device"),
], ids=["nan", "above-1", "empty", "meta"])
def test_alphas_cumprod_values(table, match):
    with pytest.raises(ValueError, match=match):
        fastat.q_sample(X0, X0, T, table)
    with pytest.raises(ValueError, match=match):
        fastat.alpha_sigma(table, T)
    raises(ValueError, match, lambda: dal(alphas_cumprod=table, timesteps=None))
    with pytest.raises(ValueError, match=match):  # FreeReplay reads the table at construction
        fastat.FreeReplay(Net(), torch.optim.SGD(Net().parameters(), lr=0.1), alphas_cumprod=table)
    with pytest.raises(ValueError, match=match):
        fastat.GuidedDiffusionAdvLosses(table)


def test_alphas_cumprod_checked_again_after_an_in_place_change():
    table = TABLE.clone()
    fastat.alpha_sigma(table, T)
    table[3] = math.nan
    with pytest.raises(ValueError, match="alphas_cumprod must hold finite values"):
        fastat.alpha_sigma(table, T)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: schedules.karras_sigmas(2.5), ValueError, "^num_steps must be an int >= 2"),
    (lambda: schedules.karras_sigmas(10, "x"), TypeError, "^sigma_min must be a float"),
    (lambda: schedules.karras_sigmas(10, 0.002, None), TypeError, "^sigma_max must be a float"),
    (lambda: schedules.karras_sigmas(10, rho="7"), TypeError, "^rho must be a float"),
    (lambda: schedules.ddpm_linear_alphas_cumprod(10, "1e-4"), TypeError, "^beta_start must be a float"),
    (lambda: schedules.ddpm_cosine_alphas_cumprod(10, math.nan), ValueError, "^s must be"),
    (lambda: schedules.ddpm_cosine_alphas_cumprod(10, 0.008, None), TypeError, "^max_beta must be a float"),
    (lambda: schedules.ddpm_cosine_alphas_cumprod(10, 0.008, -0.5), ValueError, "^max_beta must"),
    (lambda: schedules.edm_preconditioning(1.0, math.nan), ValueError, "^sigma_data must be"),
    (lambda: schedules.edm_preconditioning(-1.0), ValueError, "^sigma must be finite and > 0"),
    (lambda: schedules.edm_preconditioning("x"), TypeError, "^sigma must be a float or a floating-point tensor"),
    (lambda: schedules.consistency_preconditioning(1.0, -0.5), ValueError, "^sigma_data must be"),
    (lambda: schedules.consistency_preconditioning(torch.tensor([1.0, math.nan])), ValueError, "^sigma must be finite"),
    (lambda: schedules.ict_num_steps(1.5, 10), ValueError, "^training_step must be an int"),
    (lambda: schedules.ict_num_steps(1, None), ValueError, "^total_steps must be an int"),
    (lambda: schedules.ict_timestep_probs(schedules.karras_sigmas(10), -1.1, math.nan), ValueError, "^p_std must"),
    (lambda: schedules.ict_loss_weights(torch.tensor([2.0, 1.0, 0.5])), ValueError, "^sigmas must be finite, > 0 and ascending"),
    (lambda: schedules.ict_timestep_probs(torch.tensor([1.0])), ValueError, "^sigmas must be a 1-D ascending"),
    (lambda: schedules.ict_loss_weights(None), TypeError, "^sigmas must be a 1-D tensor"),
    (lambda: schedules.sample_ict_indices(torch.tensor([-1.0, 1.0]), 4), ValueError, "^sigmas must be finite, > 0"),
    (lambda: schedules.sample_ict_indices(schedules.karras_sigmas(10), -1), ValueError, "^batch must be an int >= 0"),
    (lambda: schedules.sample_ict_indices(schedules.karras_sigmas(10), 4, "g"), TypeError, "^generator must be"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_schedule_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_sample_ict_indices_of_an_empty_batch():
    assert schedules.sample_ict_indices(schedules.karras_sigmas(10), 0).shape == (0,)


def test_preload_rejects_an_unknown_backend():
    for bad in ("tritn", "", 1, "auto"):
        with pytest.raises(ValueError, match="^backend must be None"):
            fastat.preload(bad)


# ------------------------------------------------------------------------------------------ training


def wrong_shape(x, t):
    return x[:, :1]


def int_output(x, t):
    return (10 * x).long()


@pytest.mark.parametrize("method", ["standard", "pgd", "equivariant_adversarial", "input_perturbation"])
def test_model_output_is_named_as_the_models(method):
    # without the check the mismatch surfaced as "noise must have the shape of pred", about a tensor fastat made
    raises(ValueError, r"^model returned shape \(4, 1, 3, 3\) for an input of shape \(4, 2, 3, 3\)",
           lambda: dal(model=wrong_shape, method=method))
    raises(ValueError, r"^model returned shape \(3, 2, 3, 3\)", lambda: dal(model=lambda x, t: x[:-1], method=method))
    raises(TypeError, "^model returned a torch.int64 tensor", lambda: dal(model=int_output, method=method))
    raises(TypeError, "^model must be callable", lambda: dal(model=3, method=method))


def test_a_model_without_input_gradient_gets_a_clear_error_in_attacks():
    def detached(x, t):
        return Net()(x, t).detach()

    for method in ("pgd", "equivariant_adversarial"):
        with pytest.raises(ValueError, match="does not depend on its input through autograd"):
            dal(model=detached, method=method)
    opt = torch.optim.SGD(Net().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="does not depend on its input through autograd"):
        fastat.FreeReplay(detached, opt, 2, alphas_cumprod=TABLE).step(X0, T)
    assert dal(model=detached, method="standard").requires_grad is False  # no attack: an evaluation loss is fine


def test_diffusion_callables():
    raises(TypeError, "^radius_fn must be callable or None", lambda: dal(radius_fn="f"))
    raises(TypeError, "^radius_fn must be callable", lambda: dal(method="equivariant_random", radius_fn=3))


def test_free_replay_checks_hooks_and_loss_kwargs_at_construction():
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for kw, exc, match in [
        ({"ema": 3}, TypeError, "^ema must have update_parameters"),
        ({"lr_scheduler": "x"}, TypeError, "^lr_scheduler must have a step"),
        ({"radius_fn": "f"}, TypeError, "^radius_fn must be callable"),
        ({"alphas_cumprod": "x"}, TypeError, "^alphas_cumprod must be a 1-D tensor"),
        ({"loss_kwargs": {"mode": "ct"}}, ValueError, "^loss_kwargs is for method='cm'"),
    ]:
        with pytest.raises(exc, match=match):
            fastat.FreeReplay(net, opt, 2, **({"alphas_cumprod": TABLE} | kw))
    with pytest.raises(TypeError, match="^model must be callable"):
        fastat.FreeReplay(None, opt, 2, alphas_cumprod=TABLE)
    for loss_kwargs, exc, match in [([1], TypeError, "^loss_kwargs must be a dict"),
                                    ({"modee": "ct"}, ValueError, r"^loss_kwargs has keys .*\['modee'\]"),
                                    ({"method": "pgd"}, ValueError, r"^loss_kwargs has keys .*\['method'\]")]:
        with pytest.raises(exc, match=match):
            fastat.FreeReplay(lambda x, s: net(x, s), opt, 2, method="cm", loss_kwargs=loss_kwargs)
    with pytest.raises(ValueError, match=r"^model returned shape"):
        fastat.FreeReplay(wrong_shape, opt, 2, alphas_cumprod=TABLE).step(X0, T)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"num_scales": 2.5}, ValueError, "^num_scales must be an int >= 2"),
    ({"num_scales": 1}, ValueError, "^num_scales must be an int >= 2"),
    ({"sigma_min": "x"}, TypeError, "^sigma_min must be a float"),
    ({"sigma_data": 0.0}, ValueError, "^sigma_data must be a finite float > 0"),
    ({"sigma_data": math.nan}, ValueError, "^sigma_data must"),
    ({"huber_c": -1.0}, ValueError, "^huber_c must"),
    ({"sigmas": torch.tensor([2.0, 1.0, 0.5])}, ValueError, "^sigmas must be finite, > 0 and ascending"),
    ({"sigmas": torch.tensor([-1.0, 1.0])}, ValueError, "^sigmas must be finite, > 0"),
    ({"sigmas": "x"}, TypeError, "^sigmas must be a 1-D tensor"),
    ({"delta": X0.long()}, TypeError, "^delta must be a floating-point tensor"),
    ({"delta": torch.zeros(B, 2, 3, 3, device="meta")}, ValueError, "^delta is on meta but x0 is on cpu"),
    ({"teacher_kwargs": [1]}, TypeError, "^teacher_kwargs must be a dict"),
    ({"c_noise_fn": "f"}, TypeError, "^c_noise_fn must be callable"),
    ({"target_model": 3}, TypeError, "^target_model must be callable"),
    ({"model": None}, TypeError, "^model must be callable"),
    ({"mode": "cd", "teacher": 3}, TypeError, "^teacher must be callable"),
    ({"model": wrong_shape}, ValueError, r"^model returned shape \(4, 1, 3, 3\)"),
    ({"target_model": wrong_shape}, ValueError, r"^target_model returned shape"),
    ({"mode": "cd", "teacher": wrong_shape}, ValueError, r"^teacher returned shape"),
    ({"discretisation": "ict", "training_step": 1.5, "total_steps": 10}, ValueError, "^training_step must be an int"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_consistency_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cal(**kwargs)


def test_consistency_ict_empty_batch():
    assert float(cal(x0=torch.randn(0, 2, 3, 3), discretisation="ict", training_step=0, total_steps=10)) == 0.0


def test_edm_options_and_outputs():
    net = lambda x, s, labels: 0.5 * x  # noqa: E731
    for kw, exc, match in [({"P_mean": "x"}, TypeError, "^P_mean must be a float"), ({"P_std": 0.0}, ValueError, "^P_std must"),
                           ({"sigma_data": -1.0}, ValueError, "^sigma_data must"), ({"scaler": "s"}, TypeError, "^scaler must"),
                           ({"same_dropout": "no"}, TypeError, "^same_dropout must be True or False")]:
        with pytest.raises(exc, match=match):
            fastat.EDMAdvLoss(**kw)
    loss = fastat.EDMAdvLoss()
    for call, exc, match in [
        (lambda: loss(lambda x, s, labels: x[:, :1], X0), ValueError, "^net returned shape"),
        (lambda: fastat.EDMAdvLoss(method="standard")(lambda x, s, labels: x[:, :1], X0), ValueError, "^net returned shape"),
        (lambda: loss(lambda x, s, labels: None, X0), TypeError, "^net returned NoneType"),
        (lambda: loss(3, X0), TypeError, "^net must be callable"),
        (lambda: loss(net, X0, generator="g"), TypeError, "^generator must be"),
        (lambda: loss(net, X0, augment_pipe=lambda x: x), TypeError, r"^augment_pipe must return \(images, augment_labels\)"),
    ]:
        raises(exc, match, call)


def test_guided_diffusion_names():
    losses = fastat.GuidedDiffusionAdvLosses(TABLE)
    with pytest.raises(TypeError, match="^x_start must be a torch.Tensor"):
        losses.training_losses(Net(), X0.tolist(), T)
    with pytest.raises(TypeError, match="^t must be an integer tensor"):
        losses.training_losses(Net(), X0, T.float())
    with pytest.raises(TypeError, match="^learn_sigma must be True or False"):
        fastat.GuidedDiffusionAdvLosses(TABLE, learn_sigma="no")


def test_p2_helpers():
    sigma = torch.rand(B)
    for kw, exc, match in [({"sigma": "x"}, TypeError, "^sigma must be a floating-point tensor"),
                           ({"eps": math.nan}, ValueError, "^eps must"), ({"eps": -1.0}, ValueError, "^eps must"),
                           ({"rho": "2"}, TypeError, "^rho must"), ({"r_min": 0.0}, ValueError, "^r_min must"),
                           ({"generator": "g"}, TypeError, "^generator must")]:
        with pytest.raises(exc, match=match):
            p2_radius(**({"sigma": sigma, "eps": 0.1} | kw))
    for args, exc, match in [((torch.zeros(B),), ValueError, "^radius must be > 0"), (("x",), TypeError, "^radius must"),
                             ((torch.ones(B), math.nan), ValueError, "^lam must")]:
        with pytest.raises(exc, match=match):
            p2_weight(*args)


def test_graphed_step_checks_its_arguments_first():
    with pytest.raises(TypeError, match="^step_fn must be callable"):
        GraphedStep(3, [X0])
    with pytest.raises(ValueError, match="^warmup must be an int >= 0"):
        GraphedStep(lambda x: x, [X0], warmup=-1)


# -------------------------------------------------------------------------- non-finite gradient policy


def poisoned(net, row=1):
    """A model whose input gradient is NaN for sample `row` (of every batch copy, so also for 2B batches)."""

    def model(x, t, **kw):
        if x.requires_grad:
            def nan_rows(g):
                g = g.clone()
                g[row::B] = math.nan
                return g
            x.register_hook(nan_rows)
        return net(x, t)

    return model


def start_of(method, **kw):
    """The perturbation a call starts from (same generator draws, no ascent step)."""
    if method == "fgsm_rs":
        method, kw = "pgd", {"random_start": True, **kw}
    if method == "equivariant_adversarial":
        return dal(method="equivariant_random", return_dict=True, generator=torch.Generator().manual_seed(1), **kw)["delta"]
    return dal(method=method, steps=0, return_dict=True, generator=torch.Generator().manual_seed(1), **kw)["delta"]


@pytest.mark.parametrize("method,kw", [("pgd", {}), ("pgd", {"norm": "linf", "random_start": True}), ("fgsm_rs", {}),
                                       ("pgd", {"target": "delta", "at_diff_grad_scale": True}),
                                       ("equivariant_adversarial", {}), ("equivariant_adversarial", {"batch_branches": True})])
def test_nonfinite_gradient_keeps_the_samples_start_in_every_loss(method, kw):
    net = Net()
    out = dal(model=poisoned(net), method=method, return_dict=True, generator=torch.Generator().manual_seed(1), **kw)
    start = start_of(method, **kw)
    assert torch.equal(out["delta"][1], start[1])  # the poisoned sample keeps its start
    assert not torch.equal(out["delta"][0], start[0])  # the others moved
    assert out["delta"].isfinite().all() and out["loss_per_sample"].isfinite().all()


@pytest.mark.parametrize("method", ["p1", "p2", "cm"])
def test_nonfinite_gradient_keeps_the_samples_start_in_free_replay(method):
    outs = []
    for alpha, model_of in ((0.0, lambda n: n), (None, poisoned)):  # alpha 0: the start, unchanged by the replays
        net = Net()
        opt = torch.optim.SGD(net.parameters(), lr=0.0)
        model = model_of(net)
        kw = {"alpha": alpha, "random_start": True} if method != "p2" else {"alpha": alpha}
        if method == "cm":
            fr = fastat.FreeReplay(lambda x, s: model(x, s), opt, 3, method="cm", **kw)
            outs.append(fr.step(X0, generator=torch.Generator().manual_seed(2)))
        else:
            fr = fastat.FreeReplay(model, opt, 3, method=method, alphas_cumprod=TABLE, **kw)
            outs.append(fr.step(X0, T, generator=torch.Generator().manual_seed(2)))
    start, moved = outs[0]["delta"][0], outs[1]["delta"][0]
    assert torch.equal(moved[1], start[1]) and not torch.equal(moved[0], start[0])
    assert moved.isfinite().all() and all(bool(torch.isfinite(v)) for v in outs[1]["losses"])


def test_nonfinite_gradient_keeps_the_samples_start_in_consistency_and_edm():
    net = Net()
    out = cal(model=poisoned(net), return_dict=True)
    assert float(out["delta"][1].abs().max()) == 0.0 and float(out["delta"][0].abs().max()) > 0
    edm_net = poisoned(net)
    torch.manual_seed(5)
    attacked = fastat.EDMAdvLoss(method="pgd")(lambda x, s, labels: edm_net(x, s.reshape(-1)), X0)
    torch.manual_seed(5)
    clean = fastat.EDMAdvLoss(method="standard")(lambda x, s, labels: net(x, s.reshape(-1)), X0)
    assert torch.equal(attacked[1], clean[1]) and not torch.equal(attacked[0], clean[0])


# ------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv", [
    ["demo", "--device", "foo"], ["demo", "--device", "meta"], ["demo", "--batch", "0"], ["demo", "--threads", "0"],
    ["demo", "--lr", "nan"], ["demo", "--radius", "-1"], ["demo", "--steps", "-5"], ["demo", "--p2-scale", "inf"],
    ["experiment", "digits", "--threads", "-1"], ["experiment", "digits", "--device", "foo"],
    ["bench", "--device", "foo"], ["bench", "--threads", "0"],
])
def test_cli_bad_flags_exit_2_with_one_error_line(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    flag = next(a for a in argv if a.startswith("--"))
    assert err[-1].startswith("fastat ") and f"argument {flag}" in err[-1] and "Traceback" not in "\n".join(err)


def test_cli_bad_backend_variable_is_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.setenv("FASTAT_BACKEND", "fastest")
    fastat._backend.forget()
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err.strip() == ("fastat info: error: environment variable FASTAT_BACKEND='fastest' must be "
                                               f"one of {fastat._backend.CHOICES}")


# ------------------------------------------------------------------------------------------------ eval


def test_eval_names_the_model_and_its_options():
    from fastat.eval import ddim_sample, denoiser_error, sampler_attack

    for call, exc, match in [
        (lambda: denoiser_error(wrong_shape, X0, TABLE, T), ValueError, r"^model returned shape \(4, 1, 3, 3\)"),
        (lambda: denoiser_error(Net(), X0, TABLE, T, reference=wrong_shape), ValueError, "^reference returned shape"),
        (lambda: denoiser_error(3, X0, TABLE, T), TypeError, "^model must be callable"),
        (lambda: denoiser_error(Net(), X0, TABLE, T, generator="g"), TypeError, "^generator must"),
        (lambda: denoiser_error(Net(), X0, TABLE, T, model_kwargs=[1]), TypeError, "^model_kwargs must be a dict"),
        (lambda: ddim_sample(wrong_shape, X0, TABLE, 3), ValueError, "^model returned shape"),
        (lambda: ddim_sample(Net(), X0, TABLE, 3, perturb="p"), TypeError, "^perturb must be callable"),
        (lambda: sampler_attack(Net(), X0, TABLE, 3, attack_at=("a",)), TypeError, "^attack_at must be a sequence of int"),
        (lambda: sampler_attack(Net(), X0, TABLE, 3, attack_at=1), TypeError, "^attack_at must be a sequence of int"),
    ]:
        raises(exc, match, call)


def test_timesteps_out_of_range_refused_before_the_noise_draw():
    net = Net()  # built outside: its initialisation draws
    for bad in (torch.tensor([0, 1, 2, 100]), torch.tensor([0, -1, 2, 3])):
        state = raises(ValueError, r"^timesteps must lie in \[0, 99\]", lambda bad=bad: dal(model=net, timesteps=bad))
        assert torch.equal(torch.get_rng_state(), state)
