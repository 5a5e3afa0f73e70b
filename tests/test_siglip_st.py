"""``embedloss_kernels.losses.SigLIPLoss`` (sentence-transformers conventions): the loss of its columns against the
float64 reference, its learnable scale and bias, and a SentenceTransformerTrainer run that trains them and writes the
model card."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, gloo_rank, spawn_gloo
from tiny_model import sentences

from embedloss_kernels import reference
from embedloss_kernels.losses import SigLIPLoss

pytest.importorskip("sentence_transformers")


@pytest.mark.parametrize("n_cols", [2, 4])
@pytest.mark.parametrize("similarity", ["cos_sim", "dot_score"])
def test_columns_match_reference(n_cols, similarity):
    from sentence_transformers import util

    gen = torch.Generator().manual_seed(n_cols)
    cols = [torch.randn(6, 10, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_() for _ in range(n_cols)]
    loss_mod = SigLIPLoss(None, scale=7.0, bias=-3.0, similarity_fct=getattr(util, similarity)).to(DEVICE).double()
    loss = loss_mod.compute_loss_from_embeddings(cols, None)
    loss.backward()
    ref_cols = [c.detach().clone().requires_grad_() for c in cols]
    # the parameters as the module holds them (created in float32, then .double())
    log_s = loss_mod.logit_scale.detach().clone().requires_grad_()
    b = loss_mod.logit_bias.detach().clone().requires_grad_()
    feats = [F.normalize(c, dim=-1) for c in ref_cols] if similarity == "cos_sim" else ref_cols
    want = reference.siglip_reference(feats[0], torch.cat(feats[1:]), log_s.exp(), b)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=0)
    for c, r in zip(cols, ref_cols):
        torch.testing.assert_close(c.grad, r.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss_mod.logit_scale.grad, log_s.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss_mod.logit_bias.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_fixed_and_bad_arguments():
    fixed = SigLIPLoss(None, scale=5.0, bias=-2.0, learnable=False)
    assert not list(fixed.parameters()) and fixed.logit_scale.item() == pytest.approx(math.log(5.0))
    assert {n for n, _ in SigLIPLoss(None).named_parameters()} == {"logit_scale", "logit_bias"}
    assert SigLIPLoss(None).logit_scale.item() == pytest.approx(math.log(10.0))
    assert SigLIPLoss(None).logit_bias.item() == -10.0
    with pytest.raises(ValueError, match="scale"):
        SigLIPLoss(None, scale=0.0)
    with pytest.raises(ValueError, match="bias"):
        SigLIPLoss(None, bias=float("nan"))
    with pytest.raises(ValueError, match="similarity_fct"):
        SigLIPLoss(None, similarity_fct=lambda a, b: a @ b.T)


def test_trainer_trains_scale_and_bias_and_writes_model_card(tmp_path, tiny_st):
    datasets = pytest.importorskip("datasets")
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    model = tiny_st()
    train = datasets.Dataset.from_dict({"anchor": sentences(32, 1), "positive": sentences(32, 2),
                                        "negative": sentences(32, 3)})
    loss = SigLIPLoss(model)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=1, report_to=[],
        logging_steps=1, save_strategy="no", use_cpu=DEVICE.type == "cpu", learning_rate=1e-2,
    )
    scale0, bias0 = loss.logit_scale.item(), loss.logit_bias.item()
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=loss)
    result = trainer.train()
    assert result.global_step == 4 and math.isfinite(result.training_loss)
    assert loss.logit_scale.item() != scale0 and loss.logit_bias.item() != bias0
    model.save(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "SigLIPLoss" in card and '"bias": -10.0' in card and "zhai2023sigmoid" in card


def _gather_worker(rank, world, init_file, out_dir):
    import json
    import os

    result = {}
    with gloo_rank(rank, world, init_file):
        b_rows, dim = 3, 8
        gen = torch.Generator().manual_seed(world)
        world_cols = [torch.randn(b_rows * world, dim, generator=gen, dtype=torch.float64) for _ in range(3)]
        for schedule in ("gather", "ring"):
            os.environ["EMBEDLOSS_DISTRIBUTED_SCHEDULE"] = schedule
            local = [c[rank * b_rows : (rank + 1) * b_rows].clone().requires_grad_() for c in world_cols]
            loss_mod = SigLIPLoss(None, scale=6.0, bias=-2.0, gather_across_devices=True).double()
            loss = loss_mod.compute_loss_from_embeddings(local, None)
            loss.backward()
            # the world oracle: every rank's loss (its anchors against the world's [P; N]), the docs' gradients summed
            # over ranks (what the gather's reduce-scatter gives), the scale's and bias's this rank's own
            ref_cols = [c.clone().requires_grad_() for c in world_cols]
            log_s = loss_mod.logit_scale.detach().clone().requires_grad_()
            bias = loss_mod.logit_bias.detach().clone().requires_grad_()
            feats = [F.normalize(c, dim=-1) for c in ref_cols]
            pool = torch.cat(feats[1:])
            losses = [reference.siglip_reference(feats[0][r * b_rows : (r + 1) * b_rows], pool, log_s.exp(), bias,
                                                 positive_offset=r * b_rows) for r in range(world)]
            ds, db = torch.autograd.grad(losses[rank], [log_s, bias], retain_graph=True)
            sum(losses).backward()
            rows = slice(rank * b_rows, (rank + 1) * b_rows)
            errs = [abs(loss.item() - losses[rank].item()) / abs(losses[rank].item())]
            errs += [((c.grad - r.grad[rows]).abs().max() / r.grad[rows].abs().max()).item()
                     for c, r in zip(local, ref_cols)]
            errs += [abs(loss_mod.logit_scale.grad.item() - ds.item()) / abs(ds.item()),
                     abs(loss_mod.logit_bias.grad.item() - db.item()) / abs(db.item())]
            result[schedule] = errs
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)


@pytest.mark.parametrize("world", [2, 3])
def test_gather_across_devices_matches_world_oracle(world, tmp_path):
    import json

    spawn_gloo(_gather_worker, world, (world, str(tmp_path / "init"), str(tmp_path)), 180, f"world size {world}")
    for rank in range(world):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for schedule in ("gather", "ring"):
            assert max(result[schedule]) < 1e-10, (world, rank, schedule, result[schedule])
