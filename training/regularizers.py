"""Forgetting control for continued pre-training: EWC and Synaptic Intelligence (SI).

Both add   lambda * sum_i importance_i * (theta_i - theta0_i)^2   to the training loss
(`QuadraticPenalty`, added in `PenaltyTrainer.compute_loss`), over the TRAINABLE parameters only:
every weight in full fine-tuning; with LoRA (peft) the adapter's A/B matrices, whose theta0 is
the adapter's initialisation (B = 0, i.e. the starting model). theta0 = the starting weights.

EWC (Kirkpatrick et al., PNAS 2017): importance = the diagonal of the empirical Fisher
information at the STARTING weights, F_i = mean over general-domain blocks b of
(d loss_b / d theta_i)^2, one block per backward pass (so each square is a per-sample gradient).
With LoRA, F of the A matrices is 0 at B = 0 (their gradient vanishes there): the penalty then
holds the B matrices, which is what keeps delta W = B A near 0.

SI (Zenke, Poole & Ganguli, ICML 2017): importance = the path integral of the loss decrease each
parameter contributed along a training trajectory,
    omega_i = max(0, sum_t -g_i,t * dtheta_i,t) / (Delta_i^2 + xi),  Delta = theta_end - theta_0.
The base model's original pre-training trajectory is unavailable, so the trajectory here is a
short pass of `steps` Adam steps on general-domain text FROM the starting weights; afterwards
the weights are restored (theta0 = the starting weights, the pass leaves no trace).
Negative sums (the loss rose along that coordinate) are clipped to 0.

Importances are divided by their mean over the penalised parameters (norm="mean"), so that one
lambda scale serves EWC and SI, full and LoRA training; the raw mean is reported.
"""
from __future__ import annotations

import torch

REGULARIZERS = ("none", "ewc", "si")


def trainable_params(model) -> dict[str, torch.nn.Parameter]:
    """The parameters the optimiser updates (tied weights counted once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _loss(model, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def fisher_diagonal(model, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher of the trainable parameters: mean of squared per-batch
    gradients (pass batches of ONE block for per-sample gradients). Model in eval mode."""
    if not batches:
        raise ValueError("fisher_diagonal needs at least one batch of text")
    params = trainable_params(model)
    fisher = {n: torch.zeros_like(p, memory_format=torch.preserve_format)
              for n, p in params.items()}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            _loss(model, batch).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach() ** 2
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {n: f / len(batches) for n, f in fisher.items()}


def si_importance(model, batches: list[dict], steps: int, lr: float = 1e-4,
                  xi: float = 1e-6) -> dict[str, torch.Tensor]:
    """Synaptic-Intelligence importance from `steps` Adam steps on `batches` (cycled), starting
    at the current weights, which are restored afterwards (see the module docstring)."""
    if not batches or steps < 1:
        raise ValueError("si_importance needs at least one batch and one step")
    params = trainable_params(model)
    start = {n: p.detach().clone() for n, p in params.items()}
    path = {n: torch.zeros_like(p) for n, p in params.items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    was_training = model.training
    model.eval()  # no dropout: the same deterministic pass every time
    try:
        for t in range(steps):
            opt.zero_grad(set_to_none=True)
            _loss(model, batches[t % len(batches)]).backward()
            grads = {n: (p.grad.detach().clone() if p.grad is not None else None)
                     for n, p in params.items()}
            before = {n: p.detach().clone() for n, p in params.items()}
            opt.step()
            for n, p in params.items():
                if grads[n] is not None:
                    path[n] -= grads[n] * (p.detach() - before[n])
        omega = {n: path[n].clamp_min(0) / ((params[n].detach() - start[n]) ** 2 + xi)
                 for n in params}
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])
        opt.zero_grad(set_to_none=True)
        model.train(was_training)
    return omega


def normalize(importance: dict[str, torch.Tensor], how: str = "mean"
              ) -> tuple[dict[str, torch.Tensor], float]:
    """Importance divided by its mean (or max) over all entries; returns (scaled, divisor)."""
    if how not in ("mean", "max", "none"):
        raise ValueError(f"importance_norm={how!r} is invalid: use mean, max or none")
    total = sum(float(v.sum()) for v in importance.values())
    count = sum(v.numel() for v in importance.values())
    top = max((float(v.max()) for v in importance.values() if v.numel()), default=0.0)
    div = {"mean": total / max(count, 1), "max": top, "none": 1.0}[how]
    if div <= 0:
        raise ValueError("all importances are 0 (no gradient reached the trainable "
                         "parameters): check the data and the trainable parameters")
    return {n: v / div for n, v in importance.items()}, div


def summarize(importance: dict[str, torch.Tensor]) -> dict:
    vals = torch.cat([v.flatten() for v in importance.values()])
    return {"params": int(vals.numel()), "tensors": len(importance),
            "mean": float(vals.mean()), "max": float(vals.max()), "min": float(vals.min()),
            "zero_share": float((vals == 0).float().mean())}


class QuadraticPenalty:
    """lam * sum_i importance_i * (theta_i - theta0_i)^2 over the named parameters of `model`
    that have an importance (theta0 = their values when this object is built)."""

    def __init__(self, model, importance: dict[str, torch.Tensor], lam: float):
        if lam < 0:
            raise ValueError(f"reg_lambda={lam!r} is invalid: use >= 0")
        params = trainable_params(model)
        missing = sorted(set(importance) - set(params))
        if missing:
            raise ValueError(f"importance given for parameters that are not trainable: "
                             f"{missing[:3]}...")
        self.lam = float(lam)
        self.params = {n: params[n] for n in importance}
        self.theta0 = {n: p.detach().clone() for n, p in self.params.items()}
        self.importance = {n: importance[n].detach().to(self.params[n].dtype)
                           for n in importance}

    def __call__(self) -> torch.Tensor:
        total = torch.zeros(())
        for n, p in self.params.items():
            total = total + (self.importance[n] * (p - self.theta0[n]) ** 2).sum()
        return self.lam * total


def penalty_trainer_class():
    """transformers.Trainer with an optional penalty added to the training loss (and its mean
    logged as "penalty"; the logged "loss" is the total)."""
    from transformers import Trainer

    class PenaltyTrainer(Trainer):
        def __init__(self, *args, penalty: QuadraticPenalty | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.penalty = penalty
            self._penalties: list[float] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            if self.penalty is not None and model.training:
                pen = self.penalty()
                self._penalties.append(float(pen.detach()))
                scaled = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None \
                    else ((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                          or self.compute_loss_func is not None)
                if scaled:  # the Trainer will not divide by the accumulation steps: do it here
                    pen = pen / getattr(self, "current_gradient_accumulation_steps",
                                        self.args.gradient_accumulation_steps)
                loss = loss + pen
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if self._penalties and "loss" in logs:
                logs["penalty"] = sum(self._penalties) / len(self._penalties)
                self._penalties = []
            super().log(logs, *args, **kwargs)

    return PenaltyTrainer
