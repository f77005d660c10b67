"""ScoreModel parameterizations: exact round trips, and the oracle score survives every conversion."""

import pytest
import torch

import sdegen
from sdegen.parameterization import PARAMETERIZATIONS, ScoreModel, v_from_eps_x0

F64 = torch.float64


def _custom_sde():
    # A user-defined affine SDE with no closed-form marginal (numerical tables), not VP-like.
    return sdegen.AffineSDE(a=lambda t: -(0.3 + t), g=lambda t: (0.5 + 2 * t).sqrt(), T=1.0)


SDES = {
    "vp": lambda: sdegen.VPSDE(),
    "subvp": lambda: sdegen.SubVPSDE(),
    "ve": lambda: sdegen.VESDE(sigma_min=0.01, sigma_max=50.0),
    "custom": _custom_sde,
    "flow": lambda: sdegen.FlowMatchingSDE(),
}


class _Fixed(torch.nn.Module):
    """A 'network' returning a fixed output (to test conversions of a given F)."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t):
        return self.out


class _OracleNet(torch.nn.Module):
    """The exact score of a Gaussian mixture, expressed in the model's parameterization.

    It sees only what a real network sees, ``(x_in, t_in)`` from ``ScoreModel.net_inputs``, and
    undoes that input map itself: t = t_in * T (or t from EDM's c_noise = log(sigma)/4), x = x_in
    (or x = m * x_in / c_in for EDM).
    """

    def __init__(self, gm, sde, parameterization, sigma_data):
        super().__init__()
        self.gm, self.sde, self.p, self.sigma_data = gm, sde, parameterization, sigma_data
        self.model = None  # set after the ScoreModel exists (for raw_from_score)

    def forward(self, x_in, t_in):
        sde = self.sde
        if self.p == "edm":
            sigma = torch.exp(4 * t_in)
            t = sde.t_from_sigma(sigma).to(x_in.dtype)
            m, _ = sde.marginal(t)
            c_in = (sigma.square() + self.sigma_data**2).rsqrt()
            x = x_in * (m / c_in)[:, None]
        else:
            t, x = t_in * sde.T, x_in
        return self.model.raw_from_score(x, t, self.gm.score(x, t, sde))


def _xt(shape=(64, 2), seed=0, lo=0.02, hi=0.99):
    gen = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(shape, generator=gen, dtype=F64)
    t = lo + (hi - lo) * torch.rand(shape[0], generator=gen, dtype=F64)
    return x, t, gen


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_conversion_round_trip(sde_name, param):
    # F -> score -> F must be the identity up to float64 round-off (a few ulps times the condition
    # number of the affine maps, which is at most 1/s^2 ~ 1e3 here).
    sde = SDES[sde_name]()
    x, t, gen = _xt()
    out = torch.randn(x.shape, generator=gen, dtype=F64)
    model = ScoreModel(_Fixed(out), sde, param, sigma_data=0.7)
    score = model.score_from_raw(x, t, out)
    torch.testing.assert_close(model.raw_from_score(x, t, score), out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(model(x, t), score, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_predictions_are_mutually_consistent(sde_name, param):
    # Whatever the network predicts, eps/x0/score/v predictions describe the same (x0, eps) pair:
    # x = m x0 + s eps, score = -eps / s, v = a eps - b x0 with a = m/r, b = s/r, r = sqrt(m^2+s^2).
    sde = SDES[sde_name]()
    x, t, gen = _xt(seed=1)
    model = ScoreModel(_Fixed(torch.randn(x.shape, generator=gen, dtype=F64)), sde, param)
    m, s = (v[:, None] for v in sde.marginal(t))
    eps_hat, x0_hat, score, v = model.eps(x, t), model.x0(x, t), model.score(x, t), model.v(x, t)
    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(m * x0_hat + s * eps_hat, x, **tol)
    torch.testing.assert_close(-eps_hat / s, score, **tol)
    r = (m.square() + s.square()).sqrt()
    torch.testing.assert_close((m / r) * eps_hat - (s / r) * x0_hat, v, **tol)
    torch.testing.assert_close(v_from_eps_x0(sde, t, eps_hat, x0_hat), v, **tol)


def test_v_is_salimans_ho_for_vp():
    # For VP (m^2 + s^2 = 1), v = m eps - s x0 exactly (Salimans & Ho 2022, sec. 4).
    sde = sdegen.VPSDE()
    x0, t, gen = _xt(seed=2)
    eps = torch.randn(x0.shape, generator=gen, dtype=F64)
    m, s = (v[:, None] for v in sde.marginal(t))
    torch.testing.assert_close(v_from_eps_x0(sde, t, eps, x0), m * eps - s * x0, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_oracle_score_through_every_parameterization(sde_name, param):
    # The exact mixture score, converted to the parameterization and wrapped as a network that sees
    # only (x_in, t_in), is turned back into the exact score by ScoreModel.
    sde = SDES[sde_name]()
    gm = sdegen.named_mixture("8gaussians")
    net = _OracleNet(gm, sde, param, sigma_data=0.5)
    model = ScoreModel(net, sde, param, sigma_data=0.5)
    net.model = model
    gen = torch.Generator().manual_seed(3)
    t = 0.02 + (0.98 * sde.T - 0.02) * torch.rand(128, generator=gen, dtype=F64)
    m, s = sde.marginal(t)
    # Points drawn from p_t itself, so the check covers where the score matters.
    x = m[:, None] * gm.sample(128, generator=gen) + s[:, None] * torch.randn(128, 2, generator=gen, dtype=F64)
    exact = gm.score(x, t, sde)
    # EDM inverts t through t_from_sigma (bisection for the custom SDE): relative error ~1e-12.
    torch.testing.assert_close(model(x, t), exact, rtol=1e-7, atol=1e-7 * float(exact.abs().max()))


def test_edm_inputs_are_unit_variance_for_gaussian_data():
    # c_in scales x / m = x0 + sigma eps to unit variance when x0 has std sigma_data.
    sde = sdegen.VESDE()
    sd = 0.5
    model = ScoreModel(_Fixed(None), sde, "edm", sigma_data=sd)
    gen = torch.Generator().manual_seed(4)
    n = 20000
    t = torch.full((n,), 0.6, dtype=F64)
    _, s = sde.marginal(t)
    x = sd * torch.randn(n, 2, generator=gen, dtype=F64) + s[:, None] * torch.randn(n, 2, generator=gen, dtype=F64)
    x_in, c_noise = model.net_inputs(x, t)
    # var estimate of 2n unit-variance normals: SE = sqrt(2 / (2n)) = 0.007; allow 4 SE.
    assert abs(float(x_in.var()) - 1.0) < 0.03
    torch.testing.assert_close(c_noise, 0.25 * sde.sigma(t).log())


def test_bad_arguments():
    net = sdegen.nn.MLP(2)
    with pytest.raises(ValueError, match="parameterization must be one of"):
        ScoreModel(net, sdegen.VPSDE(), "noise")
    with pytest.raises(TypeError, match="AffineSDE"):
        ScoreModel(net, sdegen.CustomSDE(lambda x, t: -x, lambda t: 1.0), "eps")
    with pytest.raises(TypeError, match="nn.Module"):
        ScoreModel(lambda x, t: x, sdegen.VPSDE(), "eps")
    model = ScoreModel(net, sdegen.VPSDE(), "eps")
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        model(torch.randn(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match="must lie in"):
        model(torch.randn(4, 2), torch.full((4,), 2.0))


def test_model_kwargs_reach_the_net():
    net = sdegen.nn.MLP(2, num_classes=3)
    with torch.no_grad():
        net.out.weight.normal_()
    model = ScoreModel(net, sdegen.VPSDE(), "eps").double()
    x, t, _ = _xt(shape=(8, 2), seed=5)
    a, b = model(x, t, y=torch.zeros(8, dtype=torch.long)), model(x, t, y=2)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(model(x, t), model(x, t, y=net.null_label))


# ---------------------------------------------------------------------- one conversion table (issue 14, item 3)
from sdegen import adapters  # noqa: E402
from sdegen.parameterization import PREDICTIONS, convert, from_score, to_score  # noqa: E402

_ENTRY_SDES = {"vp": SDES["vp"], "subvp": SDES["subvp"], "ve": lambda: sdegen.VESDE(0.01, 20.0),
               "flow": SDES["flow"]}
_ADAPTERS = {"v": adapters.from_v, "x0": adapters.from_x0, "flow_velocity": adapters.from_flow}


@pytest.mark.parametrize("sde_name", list(_ENTRY_SDES))
@pytest.mark.parametrize("kind", list(_ADAPTERS))
def test_score_model_and_adapter_give_the_same_score(sde_name, kind):
    # The same network output F read by ScoreModel(net, sde, kind) and by adapters.from_<kind>: one
    # convention, one conversion. Before, "v" differed by 0.46 on VE and 0.027 on sub-VP.
    sde = _ENTRY_SDES[sde_name]()
    x, t, gen = _xt(seed=7)
    out = torch.randn(x.shape, generator=gen, dtype=F64)
    via_model = ScoreModel(_Fixed(out), sde, kind)(x, t)
    _, score_fn = _ADAPTERS[kind](lambda x, t: out, sde)
    torch.testing.assert_close(score_fn(x, t), via_model, rtol=1e-13, atol=1e-13)


def test_denoiser_adapter_is_the_x0_row():
    # EDM's D(x, sigma) on VE (m = 1, sigma = s) is the x0 row; from_denoiser passes sigma = s(t).
    sde_ref = sdegen.VESDE(0.01, 20.0)
    x, t, gen = _xt(seed=8)
    out = torch.randn(x.shape, generator=gen, dtype=F64)
    seen = {}

    def denoiser(x_in, sigma):
        seen["sigma"] = sigma
        return out

    _, score_fn = adapters.from_denoiser(denoiser, 0.01, 20.0)
    torch.testing.assert_close(score_fn(x, t), ScoreModel(_Fixed(out), sde_ref, "x0")(x, t), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(seen["sigma"], sde_ref.marginal(t)[1], rtol=0, atol=0)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_table_matches_the_definitions_for_a_known_pair(sde_name):
    # For data at one point x0 (a Dirac), x = m x0 + s eps has the exact score -eps/s, and every row
    # must return its defining quantity: eps; x0; v = a eps - b x0 (a = m/r, b = s/r); the path
    # velocity m' x0 + s' eps (by central differences of the marginal, step 1e-6: error ~1e-9, and
    # the numerical marginal of the custom SDE is ~1e-10 accurate).
    sde = SDES[sde_name]()
    x0, t, gen = _xt(seed=9, lo=0.05, hi=0.95)
    eps = torch.randn(x0.shape, generator=gen, dtype=F64)
    m, s = (v[:, None] for v in sde.marginal(t))
    x = m * x0 + s * eps
    score = -eps / s
    h = 1e-6
    (mp, sp), (mm, sm) = sde.marginal(t + h), sde.marginal(t - h)
    dm, ds = ((mp - mm) / (2 * h))[:, None], ((sp - sm) / (2 * h))[:, None]
    r = (m.square() + s.square()).sqrt()
    expected = {"score": score, "eps": eps, "x0": x0, "denoiser": x0, "v": (m * eps - s * x0) / r,
                "flow_velocity": dm * x0 + ds * eps}
    assert set(expected) == set(PREDICTIONS)
    for kind, value in expected.items():
        tol = 1e-6 if kind == "flow_velocity" else 1e-10
        torch.testing.assert_close(from_score(kind, score, x, t, sde), value, rtol=tol, atol=tol)
        torch.testing.assert_close(to_score(kind, value, x, t, sde), score, rtol=1e-6 if tol > 1e-9 else 1e-9,
                                   atol=1e-6 if tol > 1e-9 else 1e-9)


def test_flow_velocity_is_eps_minus_x0_on_the_straight_path():
    sde = sdegen.FlowMatchingSDE()
    x0, t, gen = _xt(seed=10)
    eps = torch.randn(x0.shape, generator=gen, dtype=F64)
    x = (1 - t)[:, None] * x0 + t[:, None] * eps
    torch.testing.assert_close(convert(eps, x, t, sde, source="eps", target="flow_velocity"), eps - x0,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(convert(eps - x0, x, t, sde, source="flow_velocity", target="x0"), x0,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("source", PREDICTIONS)
@pytest.mark.parametrize("target", PREDICTIONS)
def test_convert_round_trips(source, target):
    sde = SDES["subvp"]()
    x, t, gen = _xt(seed=11)
    out = torch.randn(x.shape, generator=gen, dtype=F64)
    back = convert(convert(out, x, t, sde, source=source, target=target), x, t, sde, source=target, target=source)
    torch.testing.assert_close(back, out, rtol=1e-9, atol=1e-9)


def test_table_errors():
    sde = sdegen.VPSDE()
    x = torch.zeros(2, 2, dtype=F64)
    t = torch.full((2,), 0.5, dtype=F64)
    with pytest.raises(ValueError, match="prediction kind must be one of .*'flow_velocity'; got 'velocity'"):
        to_score("velocity", x, x, t, sde)
    with pytest.raises(ValueError, match=r"shaped like x \(2, 2\)"):
        to_score("eps", torch.zeros(2, 3, dtype=F64), x, t, sde)
    with pytest.raises(ValueError, match="prediction kind"):
        convert(x, x, t, sde, source="eps", target="noise")


@pytest.mark.parametrize("sde_name", list(SDES))
def test_to_x0_eps_is_the_table(sde_name):
    # (x0_hat, eps_hat) from every row equals the Tweedie pair of the row's score.
    from sdegen.parameterization import to_x0_eps

    sde = SDES[sde_name]()
    x, t, gen = _xt(seed=12)
    out = torch.randn(x.shape, generator=gen, dtype=F64)
    for kind in PREDICTIONS:
        score = to_score(kind, out, x, t, sde)
        x0, eps = to_x0_eps(kind, out, x, t, sde)
        torch.testing.assert_close(x0, sde.x0_from_score(x, t, score), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(eps, sde.eps_from_score(x, t, score), rtol=1e-9, atol=1e-9)


def test_v_row_is_finite_at_zero_mean_coefficient():
    # Zero terminal SNR (m = 0, s = 1, as diffusers' rescale_betas_zero_snr ends): the v row needs no
    # division by m, so x0 = -v and eps = x exactly. Only the marginal is read, so a stub stands in.
    from sdegen.parameterization import to_x0_eps

    class _TerminalMarginal:
        def marginal(self, t):
            return torch.zeros_like(t), torch.ones_like(t)

    x = torch.linspace(-1, 1, 6, dtype=F64).reshape(3, 2)
    v = torch.full((3, 2), 0.25, dtype=F64)
    x0, eps = to_x0_eps("v", v, x, torch.ones(3, dtype=F64), _TerminalMarginal())
    torch.testing.assert_close(x0, -v, rtol=0, atol=0)
    torch.testing.assert_close(eps, x, rtol=0, atol=0)
