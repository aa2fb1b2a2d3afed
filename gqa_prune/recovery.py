"""Recovery after pruning: LoRA (peft) on every attention and MLP projection, merged back into the weights.

On a mixture of experts LoRA also adapts the fused expert tensors (peft's ``target_parameters``: one low-rank
update per expert of ``gate_up_proj`` and ``down_proj``), and the routers stay frozen (``router="frozen"``,
the default: REAP keeps them) or are trained in full (``"trainable"``, with Qwen2-MoE's shared-expert gate).

Two losses: ``lm`` (next-token cross-entropy on the training text) and ``kd`` (distillation: KL divergence
from the dense teacher's softened next-token distribution, scaled by T^2 as in Hinton et al.; logit
distillation is what the strongest pruning-recovery recipes use). Merging keeps every layer's shape, so a
recovered checkpoint has exactly the pruned model's format.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ._quiet import import_quietly
from .arch import ALL_ROLES
from .blocks import check_blocks
from .errors import GqaPruneError, require
from .moe import moe_family_for
from .settings import RecoverySettings

logger = logging.getLogger(__name__)

TARGET_MODULES = tuple(role.module for role in ALL_ROLES)  # q/k/v/o and gate/up/down
EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")  # fused experts (every supported MoE family)


@dataclass(frozen=True)
class TrainingStep:
    step: int
    loss: float
    lr: float
    tokens: int  # seen so far
    seconds: float  # since training started


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), averaged over token positions."""
    vocab = student_logits.shape[-1]
    student = nn.functional.log_softmax(student_logits.float().view(-1, vocab) / temperature, dim=-1)
    teacher = nn.functional.log_softmax(teacher_logits.float().view(-1, vocab) / temperature, dim=-1)
    return nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def _lr_factor(step: int, settings: RecoverySettings) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < settings.warmup_steps:
        return (step + 1) / (settings.warmup_steps + 1)
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lora_model(model: nn.Module, settings: RecoverySettings) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on every q/k/v/o/gate/up/down projection (seeded init)."""
    import_quietly("gptqmodel")  # peft imports it when it dispatches LoRA layers: without its banner
    peft = require("peft", "recover", "LoRA recovery")
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

    torch.manual_seed(settings.seed)
    family = moe_family_for(model.config)
    experts = {}
    if family is not None:
        experts["target_parameters"] = list(EXPERT_PARAMETERS)
        if settings.router == "trainable":
            experts["modules_to_save"] = [family.router_attr]
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(TARGET_MODULES),
        task_type="CAUSAL_LM",
        **experts,
    )
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    with warnings.catch_warnings():  # peft reads transformers' deprecated alias: a warning for peft, not for users
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        wrapped = get_peft_model(model, config)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    logger.info(
        "LoRA rank %d on %s: %s trainable parameters", settings.rank, "/".join(TARGET_MODULES), f"{trainable:,}"
    )
    return wrapped


def train(
    peft_model: nn.Module, blocks: torch.Tensor, settings: RecoverySettings, teacher: nn.Module | None = None
) -> list[TrainingStep]:
    """Train the LoRA adapters for ``settings.steps`` batches cycling through ``blocks``; returns the loss curve."""
    settings.validate()
    if settings.loss == "kd" and teacher is None:
        raise GqaPruneError("the kd loss needs the dense teacher model (--teacher)")
    device = next(peft_model.parameters()).device
    trainable = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, settings))
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(blocks), generator=generator)
    history, tokens, start = [], 0, time.perf_counter()
    peft_model.train()
    for step in tqdm(range(settings.steps), desc=f"LoRA recovery ({settings.loss})", unit="step"):
        picks = [order[(step * settings.batch_size + i) % len(order)] for i in range(settings.batch_size)]
        batch = blocks[torch.stack(picks)].to(device)
        if settings.loss == "lm":
            loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
        else:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch, use_cache=False).logits
            student_logits = peft_model(input_ids=batch, use_cache=False).logits
            loss = distillation_loss(student_logits, teacher_logits, settings.temperature)
        if not torch.isfinite(loss):
            raise GqaPruneError(
                f"recovery loss became {loss.item()} at step {step}; lower the learning rate ({settings.lr})"
            )
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch.numel()
        history.append(TrainingStep(step, loss.item(), scheduler.get_last_lr()[0], tokens, time.perf_counter() - start))
    peft_model.eval()
    return history


def merge(peft_model: nn.Module, settings: RecoverySettings) -> nn.Module:
    """Fold the adapters into the weights: the result is the plain (pruned) model class again."""
    merged = peft_model.merge_and_unload()
    if settings.gradient_checkpointing:
        merged.gradient_checkpointing_disable()
    return merged


def settings_record(settings: RecoverySettings, history: list[TrainingStep]) -> dict:
    """What a recovered checkpoint's provenance records about its training."""
    seconds = history[-1].seconds if history else 0.0
    return {
        **asdict(settings),
        "final_loss": history[-1].loss if history else None,
        "tokens": history[-1].tokens if history else 0,
        "tokens_per_second": (history[-1].tokens / seconds) if seconds else None,
    }


def write_loss_curve(history: list[TrainingStep], folder: Path, title: str) -> None:
    """training_loss.csv (step, loss, lr, tokens, seconds) and training_loss.png beside the weights."""
    from .plotting import plot_loss_curve

    lines = ["step,loss,lr,tokens,seconds"]
    lines += [f"{h.step},{h.loss},{h.lr},{h.tokens},{h.seconds:.3f}" for h in history]
    (folder / "training_loss.csv").write_text("\n".join(lines) + "\n")
    plot_loss_curve([h.step for h in history], [h.loss for h in history], folder / "training_loss.png", title)


def recover_checkpoint(
    model_dir: str | os.PathLike,
    blocks: torch.Tensor,
    settings: RecoverySettings,
    out_dir: str | os.PathLike,
    teacher_dir: str | os.PathLike | None = None,
    dtype: str = "auto",
    device: str = "auto",
) -> dict:
    """Load a pruned checkpoint, train LoRA, merge, and save the result in the same format (atomically)."""
    from .checkpoint import PLAN_FILE, save_pruned
    from .expert_plan import ExpertPlan, load_plan
    from .sources import load_model, load_tokenizer, read_provenance

    settings.validate()
    if settings.loss == "kd" and teacher_dir is None:
        raise GqaPruneError("the kd loss needs the dense teacher model (--teacher)")
    if not (Path(model_dir) / PLAN_FILE).is_file():
        raise GqaPruneError(
            f"model folder {str(model_dir)!r} holds no {PLAN_FILE}: recover trains a checkpoint written by "
            "`gqa-prune prune` (or recover), whose plan it carries into its output"
        )
    plan = load_plan(Path(model_dir) / PLAN_FILE)
    model = load_model(model_dir, dtype=dtype, device=device)
    if moe_family_for(model.config) is not None and settings.dropout:
        logger.warning("LoRA dropout %s -> 0: peft's LoRA on fused expert tensors takes no dropout", settings.dropout)
        settings = replace(settings, dropout=0.0)
    check_blocks(model, blocks, min_tokens=2, purpose="a next-token loss")
    teacher = load_model(teacher_dir, dtype=dtype, device=device) if settings.loss == "kd" else None
    peft_model = lora_model(model, settings)
    history = train(peft_model, blocks, settings, teacher=teacher)
    merged = merge(peft_model, settings).cpu()
    record = settings_record(settings, history)
    kd = f" (KL to the dense teacher, T={settings.temperature})" if settings.loss == "kd" else ""
    experts = isinstance(plan, ExpertPlan)
    routers = "trained in full" if settings.router == "trainable" else "frozen"
    targets = f" and every expert (routers {routers})" if experts else ""
    section = (
        f"## Recovery\n\nLoRA (r={settings.rank}, alpha={settings.alpha}, dropout={settings.dropout}) on every "
        f"attention and MLP projection{targets}, {settings.steps} steps of {settings.batch_size} x "
        f"{blocks.shape[1]} tokens, "
        f"lr {settings.lr}, loss `{settings.loss}`{kd}; merged into the weights. Final loss "
        f"{record['final_loss']:.4f}; the curve is in `training_loss.csv`."
    )
    title = f"LoRA recovery ({settings.loss}), r={settings.rank}, {settings.steps} steps"
    save_pruned(
        merged,
        load_tokenizer(model_dir),
        plan,
        out_dir,
        source=read_provenance(model_dir).get("source", str(model_dir)),
        provenance={"recovery": record},
        card_sections=[section],
        write_extra=lambda folder: write_loss_curve(history, folder, title),
        kind="recover",
    )
    return record
