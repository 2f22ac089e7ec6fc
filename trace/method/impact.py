"""Stage 2, alignment impact weights (Algorithm 1, lines 9-20; Algorithm 2).

With the Hessian approximated as gamma * I, the marginal gain of a conflict sample's update for the gold
objective J is <g_J, g_k> / gamma (paper Eq. 5), where g_J is the gradient of the summed relational loss
on a gold batch and g_k that of sample k's own loss, both at theta_ref. Scores are clipped at 0 and
normalised to sum 1 over the conflict set.

Two exact ways to score (impact.method): `loop` forms each g_k (one backward pass per conflict sample);
`batched` gets every sample's <g_J, g_k> of a batch from one ordinary backward pass through hooks on the
layers (see ImpactTaps), without forming any per-sample gradient.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from trace_realign.core.progress import bar_off
from trace_realign.core.records import PreferencePair

log = logging.getLogger(__name__)

# (prompt, winner, loser): a gold-batch triple for the relational loss.
Triple = tuple[str, str, str]


@dataclass
class GoldBatch:
    triples: list[Triple]
    n_retain: int
    n_invert: int
    n_punish: int


def gold_batch(
    invert: Sequence[PreferencePair],
    punish: Sequence[PreferencePair],
    retain: Sequence[PreferencePair],
    size: int,
    rng: random.Random,
) -> GoldBatch:
    """Algorithm 2: floor(B/3) retained pairs as they are, floor(B/3) inverted pairs flipped, and the rest
    punished prompts with a uniformly drawn compliant response as winner and their chosen as loser.

    UniformSample draws without replacement, so a category smaller than its share gives all it has.
    """
    if size < 1:
        raise ValueError(f"impact.gold_batch_size must be >= 1, got {size}")
    # Line 1: compliant responses are the retained winners and the inverted losers (order kept for seeding).
    compliant = list(dict.fromkeys([p.chosen for p in retain] + [p.rejected for p in invert]))
    b_r, b_i = min(len(retain), size // 3), min(len(invert), size // 3)  # line 2
    triples: list[Triple] = [(p.prompt, p.chosen, p.rejected) for p in rng.sample(list(retain), b_r)]  # line 3
    triples += [(p.prompt, p.rejected, p.chosen) for p in rng.sample(list(invert), b_i)]  # line 4
    n_p = 0
    if compliant and punish:  # line 5
        b_p = min(size - len(triples), len(punish))  # line 6
        for p in rng.sample(list(punish), b_p):  # line 7
            triples.append((p.prompt, rng.choice(compliant), p.chosen))
        n_p = b_p
    return GoldBatch(triples=triples, n_retain=b_r, n_invert=b_i, n_punish=n_p)


def flat_grad(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """d loss / d params, flattened into one vector (zeros for parameters the loss does not touch)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def gold_gradient(params: Sequence[torch.Tensor], chunk_losses: Iterable[Callable[[], torch.Tensor]]) -> torch.Tensor:
    """g_J (line 10): the gradient of the gold loss, summed over chunks so memory stays bounded."""
    total = None
    for make_loss in chunk_losses:
        g = flat_grad(make_loss(), params)
        total = g if total is None else total + g
    if total is None:
        raise ValueError("the gold batch is empty: impact weights need at least one retained, inverted or punished pair")
    return total


def impact_scores(
    params: Sequence[torch.Tensor],
    g_gold: torch.Tensor,
    sample_losses: Sequence[Callable[[], torch.Tensor] | None],
    progress: bool = True,
) -> torch.Tensor:
    """w_k = <g_J, g_k> for every sample (lines 12-19); a None entry (another rank's sample) scores 0."""
    scores = torch.zeros(len(sample_losses), dtype=torch.float64)
    for k, make_loss in enumerate(tqdm(sample_losses, desc="impact", unit="pair", disable=bar_off(progress), leave=False)):
        if make_loss is None:
            continue
        scores[k] = torch.dot(g_gold.double(), flat_grad(make_loss(), params).double())
    return scores


def clip_and_normalise(
    scores: torch.Tensor, gamma: float, served: torch.Tensor | None = None, top_k: int | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Line 20: w <- max(0, w / gamma), then w / sum|w|. With top_k, only the k highest clipped scores
    keep their weight (U2A's selection of the samples that help the gold objective most; ties by index).

    If every score clips to zero, no sample helps the gold objective at theta_ref and Algorithm 1 leaves
    nothing to train on; the weights then fall back to uniform over the `served` samples (those a term
    trains; all by default) and the fallback is reported.
    """
    if gamma <= 0:
        raise ValueError(f"impact.gamma must be positive, got {gamma}")
    if not torch.isfinite(scores).all():
        bad = torch.nonzero(~torch.isfinite(scores)).flatten().tolist()
        raise FloatingPointError(f"impact scores are not finite for conflict samples {bad[:10]} (of {len(bad)})")
    if top_k is not None and top_k < 1:
        raise ValueError(f"impact.top_k must be >= 1 or null, got {top_k}")
    w = torch.clamp(scores / gamma, min=0.0)
    if top_k is not None and top_k < len(w):
        # a stable sort keeps the lower index first among equal scores, so the choice is deterministic
        order = torch.sort(-w, stable=True).indices
        keep = torch.zeros_like(w, dtype=torch.bool)
        keep[order[:top_k]] = True
        w = torch.where(keep, w, torch.zeros_like(w))
    z = w.abs().sum()
    info = {
        "impact/nonzero": int((w > 0).sum()),
        "impact/fallback_uniform": 0,
        "impact/raw_positive_fraction": float((scores > 0).double().mean()) if len(scores) else 0.0,
    }
    if len(w) == 0:
        return w, info
    if z <= 0:
        log.warning("every impact score clipped to 0: using uniform weights")
        info["impact/fallback_uniform"] = 1
        w, _ = uniform_weights(len(w), served)
    else:
        w = w / z
    info["impact/max"] = float(w.max())
    info["impact/min"] = float(w.min())
    return w, info


def uniform_weights(n: int, served: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The no_impact ablation: every served conflict sample weighs the same (unserved ones 0)."""
    mask = torch.ones(n, dtype=torch.float64) if served is None else served.to(torch.float64)
    w = mask / mask.sum() if mask.sum() > 0 else mask
    return w, {"impact/nonzero": int((w > 0).sum()), "impact/max": float(w.max()) if n else 0.0,
               "impact/fallback_uniform": 0}


# ---------------------------------------------------------------- batched exact scores
#
# For a linear layer y_t = W a_t + c, sample k's weight gradient is sum_t b_t a_t^T (b_t = dL_k/dy_t), so
#     <G_J, g_k> = sum_t b_t^T G_J a_t  (+ sum_t b_t . G_c for the bias)
# needs only the layer's input and output gradient, which one ordinary backward pass of the summed loss
# over a batch gives for every row at once: no per-sample gradient is ever formed. Embeddings
# (sum_t G_J[token_t] . b_t) and elementwise-affine norms (y = w * n(x) + c: sum_t (G_J * n_t) . b_t) have
# the same form. A row's outputs feed only its own sample's loss, so its output gradients are those of that
# sample alone.

METHODS = ("batched", "loop")
# float64 elements one contraction may hold at once (512 MiB): large vocabularies are done a few rows at a time
_CHUNK_ELEMENTS = 1 << 26


class _Tap(torch.autograd.Function):
    """Identity on a module's output that, on the way back, hands (saved, output gradient) to `score`.

    `saved` goes through save_for_backward so that under gradient checkpointing it is dropped and recomputed
    like every other activation (the recomputed forward re-runs the hook, in the same order)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, saved: torch.Tensor, score: Callable) -> torch.Tensor:  # type: ignore[override]
        ctx.score = score
        ctx.save_for_backward(saved)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (saved,) = ctx.saved_tensors
        ctx.score(saved, grad)
        return grad, None, None


def _row_chunks(rows: int, per_row: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(per_row, 1))
    return [slice(i, i + step) for i in range(0, rows, step)]


def linear_row_scores(a: torch.Tensor, b: torch.Tensor, g_weight: torch.Tensor | None,
                      g_bias: torch.Tensor | None) -> torch.Tensor:
    """sum_t b_t^T G_W a_t + b_t . G_c for each row (first dimension), in float64."""
    rows = a.shape[0]
    a, b = a.reshape(rows, -1, a.shape[-1]), b.reshape(rows, -1, b.shape[-1])
    out = torch.zeros(rows, dtype=torch.float64, device=b.device)
    if g_weight is not None:
        gw = g_weight.double()
        d_out, d_in = gw.shape
        for s in _row_chunks(rows, a.shape[1] * min(d_in, d_out)):
            if d_in <= d_out:  # contract over the smaller side first
                out[s] += ((b[s].double() @ gw) * a[s].double()).sum((1, 2))
            else:
                out[s] += ((a[s].double() @ gw.T) * b[s].double()).sum((1, 2))
    if g_bias is not None:
        out += (b.double() @ g_bias.double()).sum(1)
    return out


def embedding_row_scores(ids: torch.Tensor, b: torch.Tensor, g_weight: torch.Tensor,
                         padding_idx: int | None) -> torch.Tensor:
    """sum_t G_J[token_t] . b_t for each row; the padding index gets no gradient, so it scores nothing."""
    rows = ids.shape[0]
    ids = ids.reshape(rows, -1)
    b = b.reshape(rows, ids.shape[1], -1)
    out = torch.zeros(rows, dtype=torch.float64, device=b.device)
    for s in _row_chunks(rows, ids.shape[1] * g_weight.shape[1]):
        dots = (g_weight[ids[s]].double() * b[s].double()).sum(-1)
        if padding_idx is not None:
            dots = dots.masked_fill(ids[s] == padding_idx, 0.0)
        out[s] += dots.sum(1)
    return out


def norm_row_scores(n: torch.Tensor, b: torch.Tensor, g_weight: torch.Tensor | None,
                    g_bias: torch.Tensor | None) -> torch.Tensor:
    """sum_t (G_w * n_t) . b_t + b_t . G_c for each row of y = w * n(x) + c."""
    rows = n.shape[0]
    n, b = n.reshape(rows, -1, n.shape[-1]).double(), b.reshape(rows, -1, b.shape[-1]).double()
    out = torch.zeros(rows, dtype=torch.float64, device=b.device)
    if g_weight is not None:
        out += ((n * b) @ g_weight.double()).sum(1)
    if g_bias is not None:
        out += (b @ g_bias.double()).sum(1)
    return out


def _is_affine_norm(module: nn.Module) -> bool:
    """A normalisation layer with 1-d elementwise weight (and bias): y = w * n(x) + c, linear in (w, c)."""
    norm_types = tuple(t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t is not None)
    named = type(module).__name__.endswith(("RMSNorm", "LayerNorm"))
    params = dict(module.named_parameters(recurse=False))
    return (isinstance(module, norm_types) or named) and set(params) <= {"weight", "bias"} and all(
        p.dim() == 1 for p in params.values())


class ImpactTaps:
    """Hooks on every module that holds a trainable parameter, scoring each row of a batch against g_J
    during an ordinary backward pass. `gold` maps each trainable parameter to its slice of g_J, a full
    tensor on the parameter's device (however it was gathered). Only grad-enabled forwards are tapped, so
    the reference's forward (adapters disabled or a frozen copy, without gradient) is not.

    Use `with ImpactTaps(model, gold) as taps:` and read `taps.rows` after each backward pass (`reset` first).
    """

    def __init__(self, model: nn.Module, gold: Mapping[torch.Tensor, torch.Tensor]):
        self.model, self.gold = model, gold
        self.rows: torch.Tensor | None = None
        self._handles: list = []
        self._busy = False  # a norm's own evaluation of n(x) must not tap itself

    def reset(self) -> None:
        self.rows = None

    def _add(self, scores: torch.Tensor) -> None:
        if self.rows is not None and self.rows.shape != scores.shape:
            raise RuntimeError(f"impact.method=batched: a layer saw {len(scores)} rows where others saw "
                               f"{len(self.rows)} (its inputs are not batch-first); set impact.method=loop")
        self.rows = scores if self.rows is None else self.rows + scores

    def _slices(self, module: nn.Module) -> dict[str, torch.Tensor | None]:
        # Read by module, as found on entry: under FSDP2 a layer's parameters are swapped for their gathered
        # (unsharded) tensors during its forward, so they are not the objects `gold` is keyed by.
        return self._by_module[module]

    def __enter__(self) -> "ImpactTaps":
        names = {p: n for n, p in self.model.named_parameters()}
        trainable = {p for p in self.model.parameters() if p.requires_grad}
        missing = [names[p] for p in trainable if p not in self.gold]
        if missing:
            raise ValueError(f"impact: no slice of g_J for trainable parameters {missing[:5]}")
        covered: set[torch.Tensor] = set()
        self._by_module: dict[nn.Module, dict[str, torch.Tensor | None]] = {}
        for module in self.model.modules():
            own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            if not own:
                continue
            self._by_module[module] = {n: self.gold[p] if p.requires_grad else None
                                       for n, p in module.named_parameters(recurse=False)}
            if isinstance(module, nn.Linear) and set(own) <= {"weight", "bias"}:
                hook = self._linear_hook
            elif isinstance(module, nn.Embedding) and set(own) == {"weight"} and not module.scale_grad_by_freq \
                    and not module.sparse:
                hook = self._embedding_hook
            elif _is_affine_norm(module):
                hook = self._norm_hook
            else:
                continue
            covered.update(own.values())
            self._handles.append(module.register_forward_hook(hook))
        uncovered = sorted(names[p] for p in trainable - covered)
        if uncovered:
            self.close()
            raise NotImplementedError(
                f"impact.method=batched scores only linear, embedding and elementwise-affine norm layers; the "
                f"trainable parameters {uncovered[:5]}{' ...' if len(uncovered) > 5 else ''} are in other modules: "
                "set impact.method=loop")
        return self

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __exit__(self, *exc) -> None:
        self.close()

    def _tapping(self, output: Any) -> bool:
        return (not self._busy and torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                and output.requires_grad)

    def _linear_hook(self, module: nn.Module, args: tuple, output: torch.Tensor):
        if not self._tapping(output):
            return None
        g = self._slices(module)
        return _Tap.apply(output, args[0].detach(),
                          lambda a, b: self._add(linear_row_scores(a, b, g.get("weight"), g.get("bias"))))

    def _embedding_hook(self, module: nn.Module, args: tuple, output: torch.Tensor):
        if not self._tapping(output):
            return None
        g = self._slices(module)["weight"]
        return _Tap.apply(output, args[0],
                          lambda ids, b: self._add(embedding_row_scores(ids, b, g, module.padding_idx)))

    def _norm_hook(self, module: nn.Module, args: tuple, output: torch.Tensor):
        if not self._tapping(output):
            return None
        g = self._slices(module)
        # n(x) = y(w=1, c=0) - y(w=0, c=0): exact for any layer affine in w (also (1 + w) * n(x) forms).
        self._busy = True
        try:
            with torch.no_grad():
                params = dict(module.named_parameters(recurse=False))
                zero = {k: torch.zeros_like(p) for k, p in params.items()}
                one = {**zero, "weight": torch.ones_like(params["weight"])}
                n = torch.func.functional_call(module, one, args) - torch.func.functional_call(module, zero, args)
        finally:
            self._busy = False
        return _Tap.apply(output, n, lambda n_, b: self._add(norm_row_scores(n_, b, g.get("weight"), g.get("bias"))))


def gold_slices(params: Sequence[torch.Tensor], g_gold: torch.Tensor) -> dict[torch.Tensor, torch.Tensor]:
    """The flat g_J split back into one tensor per parameter (views, shaped like the parameter)."""
    out, offset = {}, 0
    for p in params:
        out[p] = g_gold[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    if offset != g_gold.numel():
        raise ValueError(f"g_J has {g_gold.numel()} entries for parameters of {offset}")
    return out


@dataclass
class ImpactBatch:
    """Conflict samples of one category scored in one backward pass. `loss` builds the summed loss of
    their stacked rows (row r belongs to sample r mod len(samples)); `counted` is False for the padding
    passes that keep every rank's number of passes equal."""

    samples: list[int]
    loss: Callable[[], torch.Tensor]
    counted: bool = True


def plan_batches(categories: Sequence[str | None], rank: int, world: int, batch_size: int,
                 lengths: Sequence[int] | None = None) -> list[tuple[list[int], bool]]:
    """This rank's batches (samples k with k % world == rank and a category, grouped by category, at most
    batch_size each), padded with uncounted repeats so that every rank runs the same number of passes.
    With `lengths` (tokens per sample), a category's samples are batched in order of length, so that
    little of a batch is padding (scores do not depend on the grouping)."""
    if batch_size < 1:
        raise ValueError(f"impact.batch_size must be >= 1, got {batch_size}")

    def own(r: int) -> list[list[int]]:
        groups: dict[str, list[int]] = {}
        for k, c in enumerate(categories):
            if c is not None and k % world == r:
                groups.setdefault(c, []).append(k)
        if lengths is not None:
            groups = {c: sorted(g, key=lambda k: lengths[k]) for c, g in groups.items()}  # stable: ties by index
        return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]

    mine = own(rank)
    short = max(len(own(r)) for r in range(world)) - len(mine)
    if short == 0:
        return [(b, True) for b in mine]
    # a rank with fewer batches repeats its first (or, with none, any served sample), uncounted
    filler = mine[0] if mine else [next(k for k, c in enumerate(categories) if c is not None)]
    return [(b, True) for b in mine] + [(filler, False)] * short


def batched_impact_scores(
    model: nn.Module,
    gold: Mapping[torch.Tensor, torch.Tensor],
    batches: Sequence[ImpactBatch],
    n: int,
    progress: bool = True,
    check_rtol: float = 1e-3,
    sharded: bool = False,
) -> torch.Tensor:
    """w_k = <g_J, g_k> for every sample of `batches` (others score 0), one backward pass per batch.

    Each pass also takes the batch's summed gradient and checks that sum_k w_k = <g_J, sum_k g_k>, so a
    parameter used outside the tapped layers' forward cannot be silently left out. `sharded` (FSDP): the
    parameters are shards, so each pass is an ordinary backward (whose reduced gradients are discarded) and
    the check, which needs whole gradients, is left to the unsharded runs of the same code."""
    params = [p for p in model.parameters() if p.requires_grad]
    scores = torch.zeros(n, dtype=torch.float64)
    with ImpactTaps(model, gold) as taps:
        for batch in tqdm(batches, desc="impact", unit="batch", disable=bar_off(progress), leave=False):
            taps.reset()
            loss = batch.loss()
            if sharded:
                loss.backward()
                model.zero_grad(set_to_none=True)
            else:
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            if taps.rows is None:
                raise RuntimeError("impact.method=batched: no tapped layer took part in the loss; set impact.method=loop")
            per_sample = taps.rows.view(-1, len(batch.samples)).sum(0).cpu()
            if not sharded:
                _check_batch_sum(per_sample, grads, params, gold, check_rtol)
            if batch.counted:
                scores[batch.samples] = per_sample
    return scores


def _check_batch_sum(per_sample: torch.Tensor, grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor],
                     gold: Mapping[torch.Tensor, torch.Tensor], rtol: float) -> None:
    """sum_k w_k must equal <g_J, g_batch>: a trainable parameter used outside the tapped layers would not."""
    terms = [torch.sum(g.double() * gold[p].double()) for g, p in zip(grads, params) if g is not None]
    whole = float(torch.stack(terms).sum()) if terms else 0.0
    scale = max(float(per_sample.abs().sum()), abs(whole), 1e-30)
    if abs(float(per_sample.sum()) - whole) > rtol * scale:
        raise RuntimeError(
            f"impact.method=batched: the batch's scores sum to {float(per_sample.sum()):.6g} but <g_J, g_batch> "
            f"is {whole:.6g}; some trainable parameter is used outside the tapped layers. Set impact.method=loop")
