"""Any Hugging Face ``transformers`` model trained by this package's optimizers through
``transformers.Trainer`` (the ``hf`` extra)::

    from lorenza.integrations.hf import LorenzaTrainer
    trainer = LorenzaTrainer(model=model, args=TrainingArguments(...), train_dataset=data,
                             optim="lorenza", rank=128, target_modules=("attn", "mlp"),
                             optim_kwargs={"update_gap": 200, "rho_max": 0.01})
    trainer.train()

``Trainer.training_step`` sees one micro-batch at a time, but a sharpness-aware step needs the
loss of the whole step at other weights before its first backward, and a forward-only one
(MeZO, LOREN) has no backward at all. ``Trainer`` gathers a step's micro-batches before its
first ``training_step`` (``get_batch_samples``); ``LorenzaTrainer`` keeps them, and on the
step's first micro-batch runs the optimizer's probes and ascent (``perturb``, with the whole
step as its closure) or, forward-only, the whole step. The micro-batches' forward/backward
at ``W + ε``, clipping, ``optimizer.step()`` (which puts ``W`` back and updates), the
learning-rate scheduler (which moves ρ with the learning rate), ``Trainer``'s checkpoints
and resume are ``Trainer``'s own.

The optimizers that probe the loss with forward passes (LORENZA, Lorenza+, AdaZo-SAM,
MeZO, LOREN) run in one process here: several processes would each probe their own batch.

Low-rank matrices are chosen as GaLore's ``optim_target_modules``: the weights of
``nn.Linear`` modules whose name contains one of ``target_modules``. Updates are not fused
into the backward: ``Trainer`` clips and steps after the whole backward, and owns it.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from lorenza.groups import lowrank_param_groups, module_blocks
from lorenza.loren import LOREN
from lorenza.mezo import MeZO
from lorenza.names import OPTIMIZER_NAMES as OPTIMIZERS
from lorenza.variants import APOLLO, AdaZoSAM, APOLLOMini, Fira, GaLoreAdamW, Lorenza, LorenzaPlus

LOWRANK = (GaLoreAdamW, Fira, APOLLO, APOLLOMini, Lorenza, LorenzaPlus)
FORWARD_ONLY = (MeZO, LOREN)


class LorenzaTrainer(Trainer):
    """``transformers.Trainer`` with ``optim`` (a name of ``OPTIMIZERS``) as its optimizer:
    low-rank ones manage the ``nn.Linear`` weights named by ``target_modules`` in ``rank``.
    ``TrainingArguments`` give the learning rate, weight decay, Adam's betas and ε and the
    seed; ``optim_kwargs`` any other argument of the optimizer's class (``update_gap``,
    ``rho_max``, ``bits=8`` ...)."""

    def __init__(
        self,
        *args,
        optim: str = "lorenza",
        rank: int = 128,
        target_modules: tuple[str, ...] = ("attn", "mlp"),
        optim_kwargs: dict | None = None,
        **kwargs,
    ):
        if optim not in OPTIMIZERS:
            raise ValueError(f"optim={optim!r} is not one of {', '.join(OPTIMIZERS)}")
        if rank <= 0:
            raise ValueError(f"rank={rank} must be a positive integer")
        self.optim, self.rank, self.target_modules = optim, rank, tuple(target_modules)
        self.optim_kwargs = dict(optim_kwargs or {})
        self._step_batches: list = []
        self._step_items = None
        super().__init__(*args, **kwargs)
        probes = OPTIMIZERS[optim][0] in (*FORWARD_ONLY, Lorenza, LorenzaPlus, AdaZoSAM)
        if probes and self.args.world_size > 1:
            raise ValueError(
                f"optim={optim!r} in {self.args.world_size} processes: its forward probes' "
                "losses would not be averaged over the processes, which could then move "
                "apart; run it in one process (train.py averages them)"
            )

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        (cls, bits), a = OPTIMIZERS[self.optim], self.args
        kwargs = {"lr": a.learning_rate, "weight_decay": a.weight_decay, "seed": a.seed}
        if cls in FORWARD_ONLY:
            optimizer = cls(model.parameters(), **kwargs | self.optim_kwargs)
            whole_step = optimizer.step

            def step(closure=None):  # the step ran in training_step: Trainer's call is a no-op
                return None if closure is None else whole_step(closure)

            optimizer.step = step
            self.optimizer = optimizer
            return optimizer
        kwargs |= {"betas": (a.adam_beta1, a.adam_beta2), "eps": a.adam_epsilon, "bits": bits}
        kwargs["blocks"] = module_blocks(model)
        params = model.parameters()
        if cls in LOWRANK:
            params = lowrank_param_groups(model, self.rank, self.target_modules)
            if not params[0]["params"]:
                raise ValueError(
                    f"target_modules={self.target_modules} names no nn.Linear of the model: "
                    "a low-rank optimizer needs at least one"
                )
        self.optimizer = cls(params, **kwargs | self.optim_kwargs)
        return self.optimizer

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """``Trainer``'s micro-batches of the coming step, kept for its first
        ``training_step``."""
        batches, items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_batches, self._step_items = batches, items
        return batches, items

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """On a step's first micro-batch: the probes and ascent over the whole step (or,
        forward-only, the whole step); then ``Trainer``'s forward/backward of the
        micro-batch, at ``W + ε``."""
        first = bool(self._step_batches) and inputs is self._step_batches[0]
        optimizer = self._optimizer()
        if isinstance(optimizer, FORWARD_ONLY):
            if not first:
                return torch.zeros((), device=self.args.device)
            model.train()
            return optimizer.step(lambda: self._step_loss(model)).detach()
        if first:
            model.train()
            optimizer.perturb(lambda: self._step_loss(model), lambda *_: self._backward(model))
        return super().training_step(model, inputs, num_items_in_batch)

    def _optimizer(self) -> torch.optim.Optimizer:
        """Our optimizer, inside the wrapper ``accelerate`` puts around it."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _micro_loss(self, model, inputs) -> torch.Tensor:
        """A micro-batch's loss as ``Trainer.training_step`` scales it for accumulation."""
        inputs = self._prepare_inputs(dict(inputs))
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=self._step_items)
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and self._step_items is not None) or (
                self.compute_loss_func is not None
            )
        return loss if scaled else loss / self.current_gradient_accumulation_steps

    def _step_loss(self, model) -> torch.Tensor:
        """The whole step's loss (the closure of ``perturb``): forward only without grad;
        with grad also its backward, micro-batch by micro-batch."""
        total = None
        for inputs in self._step_batches:
            loss = self._micro_loss(model, inputs)
            if torch.is_grad_enabled():
                loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total

    def _backward(self, model) -> torch.Tensor:
        """The step's forward/backward at the weights as they are (a refresh at ``W``, SAM's
        ascent gradient), whatever the caller's grad mode."""
        with torch.enable_grad():
            return self._step_loss(model)
