"""Workload forecasters: a TCN and a 2-layer LSTM, both (batch, W, C) -> (batch, H, C).

Both read a window of ``W`` past steps of ``C`` resource columns (e.g. CPU %
and memory, already normalised) and emit the next ``H`` steps of every column
at once (direct multi-horizon forecasting, no autoregressive feedback).

* :class:`TCN` follows Bai, Kolter & Koltun (2018), "An Empirical Evaluation
  of Generic Convolutional and Recurrent Networks for Sequence Modeling":
  residual blocks of two dilated causal convolutions each, dilation doubling
  per level (1, 2, 4, ...), ReLU, dropout, optional weight normalisation and a
  1x1 convolution on the skip path when the channel count changes.
* :class:`LSTMForecaster` is the workload predictor of paper 002
  (DYNAMIC-ALLOCATOR), §3.1: "A two-layer LSTM network with 64 hidden units in
  each layer". The paper gives no head, window or horizon; the linear head on
  the last hidden state is our choice.
* :class:`LevelCentred` wraps either one to forecast relative to an anchor:
  the window's mean level (robust to level shifts) or its last value
  (``level_steps=1``: the residual on top of persistence, so that a network
  whose output is 0 *is* the last-value forecast).
* :class:`Quantiles` makes either one probabilistic: the network emits
  ``len(levels)`` quantiles per step and column (trained on the pinball
  loss); ``forward`` returns the median, the point forecast.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as _weight_norm

from fl_common.costs import module_costs


class CausalConv1d(nn.Module):
    """Dilated 1-D convolution whose output at step t sees only steps <= t.

    Parameters
    ----------
    in_channels : int
        Input feature maps.
    out_channels : int
        Output feature maps.
    kernel_size : int
        Taps per filter.
    dilation : int
        Spacing between taps, in steps.
    weight_norm : bool
        Reparametrise the weight as ``g * v / ||v||`` (Salimans & Kingma 2016).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, dilation: int, weight_norm: bool
    ) -> None:
        super().__init__()
        # Left-pad by the kernel's reach instead of padding both sides and
        # chomping the right end (Bai et al.'s code): same result, no waste.
        self.left_pad = (kernel_size - 1) * dilation
        conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation)
        self.conv = _weight_norm(conv) if weight_norm else conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` of shape (batch, channels, T); the output keeps length T."""
        return self.conv(F.pad(x, (self.left_pad, 0)))


class TemporalBlock(nn.Module):
    """Bai et al.'s residual block: two causal convolutions plus a skip path.

    Parameters
    ----------
    in_channels : int
        Input feature maps.
    out_channels : int
        Output feature maps of both convolutions.
    kernel_size : int
        Taps per filter.
    dilation : int
        Dilation of both convolutions.
    dropout : float
        Dropout probability after each convolution's ReLU.
    weight_norm : bool
        Weight-normalise both convolutions.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int,
        dropout: float,
        weight_norm: bool,
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            CausalConv1d(in_channels, out_channels, kernel_size, dilation, weight_norm),
            nn.ReLU(),
            nn.Dropout(dropout),
            CausalConv1d(out_channels, out_channels, kernel_size, dilation, weight_norm),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        # A 1x1 convolution only where the channel count changes (first block).
        self.skip = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (batch, in_channels, T) to (batch, out_channels, T), causally."""
        return F.relu(self.body(x) + self.skip(x))


class TCN(nn.Module):
    """Temporal convolutional network forecaster (Bai et al. 2018).

    ``levels`` residual blocks with dilations 1, 2, 4, ..., 2**(levels-1),
    each holding two causal convolutions, turn the window into a feature
    sequence; a linear head maps the features at the last step to all
    ``horizon x in_channels`` outputs. The receptive field, the number of
    past steps the last step's features depend on, is

    ``1 + 2 * (kernel_size - 1) * (2**levels - 1)``

    (two convolutions per level, each reaching ``(kernel_size - 1) * dilation``
    steps back): 61 steps, about 5 h at 300 s, with the defaults. Windows
    longer than that are cropped to their last ``receptive_field`` steps in
    :meth:`forward`, which leaves the forecast unchanged and saves compute.

    Parameters
    ----------
    in_channels : int
        Resource columns C per step, both in the input and the forecast.
    horizon : int
        Steps H to forecast.
    channels : int, default 32
        Feature maps in every residual block.
    levels : int, default 4
        Residual blocks; block i has dilation ``2**i``.
    kernel_size : int, default 3
        Taps per convolution (at least 2, or nothing is learnt from the past).
    dropout : float, default 0.1
        Dropout probability inside the blocks (Bai et al. tune it per task).
    weight_norm : bool, default False
        Weight-normalise the convolutions as Bai et al. do. Off by default:
        plain weights keep ``state_dict`` keys, and so federated parameter
        averaging, simple (weight norm splits each weight into ``g`` and ``v``).
    """

    def __init__(
        self,
        in_channels: int,
        horizon: int,
        channels: int = 32,
        levels: int = 4,
        kernel_size: int = 3,
        dropout: float = 0.1,
        weight_norm: bool = False,
    ) -> None:
        super().__init__()
        _check_sizes(in_channels=in_channels, horizon=horizon, channels=channels, levels=levels)
        if kernel_size < 2:
            raise ValueError(f"kernel_size={kernel_size}: need at least 2 taps to see past steps")
        self.in_channels, self.horizon = in_channels, horizon
        self.levels, self.kernel_size = levels, kernel_size
        widths = [in_channels] + [channels] * levels  # block i maps widths[i] -> channels
        self.blocks = nn.Sequential(
            *(TemporalBlock(widths[i], channels, kernel_size, 2**i, dropout, weight_norm) for i in range(levels))
        )
        self.head = nn.Linear(channels, horizon * in_channels)

    @property
    def receptive_field(self) -> int:
        """Past steps (the current one included) that one output step depends on."""
        return 1 + 2 * (self.kernel_size - 1) * (2**self.levels - 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stack's output, one feature vector per input step.

        Parameters
        ----------
        x : torch.Tensor, shape (batch, W, C)
            Input window.

        Returns
        -------
        torch.Tensor, shape (batch, channels, W)
            Column t depends on input steps <= t only (causal).
        """
        return self.blocks(x.transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forecast the next ``horizon`` steps.

        Parameters
        ----------
        x : torch.Tensor, shape (batch, W, C)
            Input window, any W >= 1.

        Returns
        -------
        torch.Tensor, shape (batch, horizon, C)
        """
        # Steps before the receptive field cannot reach the last step's
        # features, so cropping them changes nothing but the cost.
        last = self.features(x[:, -self.receptive_field :])[:, :, -1]
        return self.head(last).view(-1, self.horizon, self.in_channels)


class LSTMForecaster(nn.Module):
    """Two-layer LSTM forecaster, 64 hidden units per layer (paper 002, §3.1).

    Parameters
    ----------
    in_channels : int
        Resource columns C per step, both in the input and the forecast.
    horizon : int
        Steps H to forecast.
    hidden : int, default 64
        Hidden units per LSTM layer (paper 002: 64).
    layers : int, default 2
        Stacked LSTM layers (paper 002: 2).
    dropout : float, default 0.0
        Dropout between the LSTM layers (PyTorch applies it to all but the
        last layer's output); paper 002 gives none.
    """

    def __init__(
        self, in_channels: int, horizon: int, hidden: int = 64, layers: int = 2, dropout: float = 0.0
    ) -> None:
        super().__init__()
        _check_sizes(in_channels=in_channels, horizon=horizon, hidden=hidden, layers=layers)
        self.in_channels, self.horizon = in_channels, horizon
        self.lstm = nn.LSTM(in_channels, hidden, num_layers=layers, batch_first=True, dropout=dropout)
        self.head = nn.Linear(hidden, horizon * in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forecast the next ``horizon`` steps.

        Parameters
        ----------
        x : torch.Tensor, shape (batch, W, C)
            Input window, any W >= 1.

        Returns
        -------
        torch.Tensor, shape (batch, horizon, C)
        """
        _, (h_n, _) = self.lstm(x)
        # h_n[-1]: the top layer's hidden state after the window's last step.
        return self.head(h_n[-1]).view(-1, self.horizon, self.in_channels)


class Quantiles(nn.Module):
    """Quantile forecasts from a point forecaster with ``Q`` times the horizon.

    ``inner`` maps (batch, W, C) to (batch, Q * H, C); the Q blocks of H steps
    are read as the quantiles at ``levels`` and sorted along the quantile axis,
    so the quantiles never cross (sorting is a permutation: the pinball
    gradients reach every output). :meth:`forward` returns the median, the
    forecast that minimises the absolute error the MAE and MASE measure.

    Parameters
    ----------
    inner : torch.nn.Module
        Built with ``horizon = len(levels) * H``.
    horizon : int
        Steps H.
    levels : tuple of float
        Increasing quantile levels in (0, 1), 0.5 among them.
    """

    def __init__(self, inner: nn.Module, horizon: int, levels: tuple[float, ...]) -> None:
        super().__init__()
        check_quantile_levels(levels)
        self.inner, self.horizon, self.quantile_levels = inner, horizon, tuple(float(q) for q in levels)
        self.median = self.quantile_levels.index(0.5)

    @property
    def receptive_field(self) -> int | None:
        return getattr(self.inner, "receptive_field", None)

    def forward_quantiles(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, W, C) -> (batch, H, C, Q), increasing along the last axis."""
        out = self.inner(x)
        q = out.view(out.shape[0], len(self.quantile_levels), self.horizon, out.shape[-1]).permute(0, 2, 3, 1)
        return torch.sort(q, dim=-1).values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The median forecast, (batch, H, C)."""
        return self.forward_quantiles(x)[..., self.median]


def check_quantile_levels(levels) -> None:
    """Raise a ValueError unless ``levels`` increase strictly inside (0, 1) and hold 0.5."""
    levels = [float(q) for q in levels]
    if not (levels and all(0 < q < 1 for q in levels) and all(a < b for a, b in zip(levels, levels[1:]))
            and 0.5 in levels):
        raise ValueError(f"quantile levels {levels}: need strictly increasing levels in (0, 1) including 0.5 "
                         "(the median is the point forecast), e.g. [0.1, 0.5, 0.9]")


class LevelCentred(nn.Module):
    """Forecast relative to each window's recent level, then add the level back.

    The wrapped network sees ``x - level`` and its forecast is shifted by
    ``+ level``, where ``level`` is the per-channel mean of the window's last
    ``level_steps`` steps. With ``level_steps=1`` the level is the last value
    and the network forecasts the residual on top of persistence: a network
    whose output is 0 gives exactly the last-value forecast. The network thus
    models the shape of the series
    around its current level, and a level shift after training does not push
    its inputs off the training distribution: in the last six days of GWA-T-12
    2013-8, VM 392's daily mean CPU falls from about 52 % to 24-37 % and
    VM 407's climbs from about 61 % to 65-90 %. This is
    the centring half of RevIN (Kim et al., ICLR 2022), without its scaling
    and affine parameters: a flat window would make a per-window scale blow up.

    Parameters
    ----------
    inner : torch.nn.Module
        Forecaster mapping (batch, W, C) to (batch, H, C).
    level_steps : int
        Trailing steps averaged into the level (1: the last value; W: the
        whole window's mean).
    """

    def __init__(self, inner: nn.Module, level_steps: int) -> None:
        super().__init__()
        _check_sizes(level_steps=level_steps)
        self.inner, self.level_steps = inner, level_steps

    @property
    def receptive_field(self) -> int | None:
        """The inner network's receptive field, if it has one (TCN)."""
        return getattr(self.inner, "receptive_field", None)

    @property
    def quantile_levels(self) -> tuple[float, ...]:
        return getattr(self.inner, "quantile_levels", ())

    def _level(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -self.level_steps :].mean(dim=1, keepdim=True)  # (batch, 1, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forecast ``x`` of shape (batch, W, C) as (batch, H, C)."""
        level = self._level(x)
        return self.inner(x - level) + level

    def forward_quantiles(self, x: torch.Tensor) -> torch.Tensor:
        """Quantile forecasts (batch, H, C, Q) of a :class:`Quantiles` inner network."""
        level = self._level(x)
        return self.inner.forward_quantiles(x - level) + level.unsqueeze(-1)


def _check_sizes(**sizes: int) -> None:
    """Raise a ValueError naming every size argument that is not a positive int."""
    bad = {name: value for name, value in sizes.items() if not (isinstance(value, int) and value >= 1)}
    if bad:
        raise ValueError(f"need positive integers, got {bad}")


FORECASTERS: dict[str, type[nn.Module]] = {"tcn": TCN, "lstm": LSTMForecaster}
# task.anchor -> LevelCentred's level_steps (None: no wrapper); "window_mean" needs the window W.
ANCHORS = ("last_value", "window_mean", "none")


def anchor_level_steps(anchor: str, window: int) -> int | None:
    """``level_steps`` of an anchor: 1 (residual on persistence), W (window mean) or None."""
    if anchor not in ANCHORS:
        raise ValueError(f"task.anchor={anchor} is unknown: choose one of {', '.join(ANCHORS)}")
    return {"last_value": 1, "window_mean": window, "none": None}[anchor]


def is_head_key(key: str) -> bool:
    """Whether a forecaster's state-dict entry belongs to its output layer (the
    personal head of FedPer-style personalisation): ``head.weight``, ``inner.head.bias``..."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2] == "head"


def build_forecaster(
    name: str,
    in_channels: int,
    horizon: int,
    seed: int | None = None,
    level_steps: int | None = None,
    quantiles: tuple[float, ...] = (),
    zero_head: bool = False,
    **kwargs,
) -> nn.Module:
    """Instantiate a forecaster by config name.

    Parameters
    ----------
    name : str
        ``"tcn"`` (:class:`TCN`) or ``"lstm"`` (:class:`LSTMForecaster`).
    in_channels : int
        Resource columns C per step.
    horizon : int
        Steps H to forecast.
    seed : int, optional
        Seeds PyTorch's global RNG before construction, fixing the initial
        weights; None leaves the RNG as it is.
    level_steps : int, optional
        If given, wrap the network in :class:`LevelCentred` with this many
        trailing steps forming the level (1: residual on the last value);
        None returns the bare network.
    quantiles : tuple of float, optional
        Quantile levels (with 0.5): wrap the network in :class:`Quantiles`;
        empty gives a point forecaster.
    zero_head : bool, default False
        Zero the output layer, so the untrained model forecasts the anchor
        exactly (with ``level_steps=1``: persistence) and training starts
        from the last-value forecast rather than from noise around it.
    **kwargs
        Further constructor arguments of the chosen class (e.g. ``channels``,
        ``levels`` for the TCN; ``hidden`` for the LSTM).

    Returns
    -------
    torch.nn.Module
        Maps (batch, W, C) to (batch, horizon, C).

    Raises
    ------
    ValueError
        If ``name`` is not a known forecaster.
    """
    if name not in FORECASTERS:
        raise ValueError(f"unknown forecaster {name!r}: choose one of {', '.join(map(repr, FORECASTERS))}")
    if seed is not None:
        torch.manual_seed(seed)
    quantiles = tuple(quantiles)
    model = FORECASTERS[name](in_channels=in_channels, horizon=horizon * max(1, len(quantiles)), **kwargs)
    if zero_head:
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
    if quantiles:
        model = Quantiles(model, horizon, quantiles)
    return model if level_steps is None else LevelCentred(model, level_steps)


@lru_cache(maxsize=8)
def forecaster_costs(
    name: str, in_channels: int, window: int, horizon: int, level_steps: int | None = None,
    quantiles: tuple[float, ...] = (),
) -> tuple[float, int, int]:
    """(forward FLOPs per window, parameter count, activation floats per window)
    of a workload forecaster (``quantiles``: its quantile levels, () for a
    point forecaster); see :func:`fl_common.costs.module_costs`."""
    model = build_forecaster(name, in_channels, horizon, level_steps=level_steps, quantiles=quantiles)
    return module_costs(model, torch.zeros(1, window, in_channels))


def forecaster_from_settings(settings: dict, in_channels: int, horizon: int, seed: int | None = None) -> nn.Module:
    """The forecaster a run's settings describe (``tasks.forecast.server.forecaster_settings``)."""
    return build_forecaster(settings["model"], in_channels=in_channels, horizon=horizon, seed=seed,
                            level_steps=settings["level_steps"], quantiles=tuple(settings["quantiles"]),
                            zero_head=bool(settings["zero_head"]))
