"""How much of the shared encoder's gradient comes from the attribute loss, per balancing strategy.

At initialisation the attribute cross-entropy (five groups, ~2.2 nats each) sends a far larger gradient
into the shared image encoder than the mask loss does. This measures, on real phantom lesion ROIs
(the bundle's pre-processing and simulated first clicks), the norm of each loss's gradient on the
encoder parameters, for the bundle's model at initialisation and after a few training steps:

* ``full``: the paper, L = L_seg + λ L_attr with λ = 1, the attribute gradient unbounded;
* ``uncertainty``: the bundle's adaptive λ (uncertainty weighting) from its starting value 0.1;
* ``warmup``: loss scheduling, λ ramps from 0 (the ratio at step 0 is 0 by construction);
* ``normalised``: :class:`~segreport.networks.blocks.gradient_balance.GradientBalance` caps what the
  attribute loss sends into the trunk at the mask loss's running gradient norm (the bundle's default).

Which strategy trains both tasks best is measured by the quality benchmark (``--set attr_gradient=full``
etc., see docs/results.md); this one shows what each does to the gradients.

    python -m benchmarks.studies.loss_balance        # ~1 min on one CPU thread
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from segreport import phantom
from segreport.losses.lesion_report import LesionReportLoss
from segreport.models.lesion_report_3d import build_network
from segreport.training.click_training import SimulatedClicksInferer
from segreport.training.lesion_report import load_datalists, training_transforms
from segreport.transforms.attributes import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[2]

STRATEGIES = {  # name -> (network attr_gradient, λ, learned λ)
    "full": ("full", 1.0, False),
    "uncertainty": ("full", 0.1, True),
    "normalised": ("normalised", 1.0, False),
}


def encoder_grad_norms(net, loss_fn, batch, inferer) -> dict:
    """Gradient norms on the image encoder from the mask loss and from λ·attribute loss, separately: one
    forward, each term through the loss module itself (given only its task's outputs)."""
    image, label, attrs = batch
    out = inferer(image, net, label)
    params = [p for p in net.image_encoder.parameters() if p.requires_grad]
    norms, lam = {}, None
    for name, outputs, targets in (("mask", {"mask_logits": out["mask_logits"]}, (label, None)),
                                   ("attributes", {"attr_logits": out["attr_logits"]}, (None, attrs))):
        total, parts = loss_fn(outputs, *targets)
        grads = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
        norms[name] = float(torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None)))
        lam = float(parts["lambda_attr"])
    return {**norms, "attributes_over_mask": norms["attributes"] / max(norms["mask"], 1e-12), "lambda": lam}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="training steps before the second measurement")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "loss_balance.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        phantom.generate_dataset(Path(tmp) / "phantom", n_cases=8, seed=3, shape=(128, 128, 32), spacing=(2.4, 2.4, 7.5), export_2d=False)
        lists = load_datalists(Path(tmp) / "phantom", ratios=(100, 0, 0), lesions="all")
        tf = training_transforms(32, (2.4, 2.4, 5.0))
        items = [tf(dict(it)) for it in lists["training"][:8]]
    batch = (torch.stack([d["image"] for d in items]), torch.stack([d["label"] for d in items]), torch.stack([d["attr_target"] for d in items]))
    result = {"benchmark": "loss_balance", "command": "python -m benchmarks.studies.loss_balance", "lesions": len(items),
              "steps": a.steps, "strategies": {}}
    for name, (attr_gradient, lam, adaptive) in STRATEGIES.items():
        torch.manual_seed(0)
        net = build_network(backbone="resunet", lesion_pooling=True, attr_gradient=attr_gradient, spacing=(2.4, 2.4, 5.0)).train()
        loss_fn = LesionReportLoss(lambda_attr=lam, adaptive_lambda=adaptive, lambda_bce=1.0, ignore_index=IGNORE_INDEX)
        inferer = SimulatedClicksInferer(train=True, max_rounds=0, prompt_dropout=0.0, seed=0)
        opt = torch.optim.AdamW([*net.parameters(), *loss_fn.parameters()], lr=1e-3)
        # at step 0 GradientBalance has seen no mask gradient yet: one joint step lets it observe one
        start = encoder_grad_norms(net, loss_fn, batch, inferer)
        for _ in range(a.steps):
            opt.zero_grad()
            image, label, attrs = batch
            loss_fn(inferer(image, net, label), label, attrs)[0].backward()
            opt.step()
        # the joint gradient's attribute share after training: measured through the balance (if any)
        after = encoder_grad_norms(net, loss_fn, batch, inferer)
        result["strategies"][name] = {"init": start, f"after_{a.steps}_steps": after}
        print(f"{name}: attribute/mask gradient on the encoder {start['attributes_over_mask']:.1f}x at init, "
              f"{after['attributes_over_mask']:.1f}x after {a.steps} steps", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
