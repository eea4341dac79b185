"""Make a benchmark's exported weights a checkpoint a user can load alone (``pretrained/``).

``benchmarks/accuracy.py --methods ... --export DIR`` builds its learners with a network object, so the file's
hyperparameters lack the network; this adds it as a LightningCLI ``class_path`` config (as ``train.py``'s
checkpoints hold it), with the learner's class path and LightningCLI's instantiator, keeps weights and
hyperparameters only, and checks that ``<Learner>.load_from_checkpoint(DST)`` rebuilds it:

  python scripts/ship_checkpoint.py round_b_export/imaml.ckpt pretrained/omniglot_5way1shot_imaml_gd.ckpt \\
      --learner lightning_imaml.IMAML --network lightning_imaml.OmniglotConv4 --network-args '{"n_way": 5}'
"""

import argparse
import importlib
import json

import torch

KEEP = ("epoch", "global_step", "pytorch-lightning_version", "state_dict", "hparams_name", "hyper_parameters",
        "meta_learner")  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--learner", required=True, help="class path, e.g. lightning_imaml.IMAML")
    p.add_argument("--network", required=True, help="class path, e.g. lightning_imaml.OmniglotConv4")
    p.add_argument("--network-args", default="{}", help="the network's init arguments as JSON")
    a = p.parse_args(argv)
    ckpt = torch.load(a.src, map_location="cpu", weights_only=True)
    ckpt = {k: v for k, v in ckpt.items() if k in KEEP}
    hp = ckpt["hyper_parameters"]
    hp["model"] = {"class_path": a.network, "init_args": json.loads(a.network_args)}
    hp["_class_path"] = a.learner
    hp["_instantiator"] = "pytorch_lightning.cli.instantiate_module"
    torch.save(ckpt, a.dst)
    module, name = a.learner.rsplit(".", 1)
    learner = getattr(importlib.import_module(module), name).load_from_checkpoint(a.dst, map_location="cpu")
    n = sum(v.numel() for v in learner.state_dict().values())
    print(
        f"wrote {a.dst}: {type(learner).__name__} over {type(learner.model).__name__}, {n} values, "
        f"step {ckpt.get('global_step')}"
    )


if __name__ == "__main__":
    main()
