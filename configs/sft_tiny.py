"""Supervised fine-tuning of the tiny model (configs/tiny.py) on the embedded chat task set:
`python -m glm_jax.sft --config.init_from=runs/tiny` (a train.py workdir, or a converted
hub checkpoint with `--config.sft.tokenizer`); add `--config.sft.teachers=ckptA,ckptB` to
distill teacher checkpoints into it.

The default is what the tiny model learns in a demo's time on two CPU cores: two-digit
addition (tasks=add, max_digits=2), thinking and non-thinking, from a base pretrained for
2000 steps (`python train.py --workdir runs/tiny --config.train.steps=2000`; a 200-step base
had not learned to copy from its context, and SFT from it stayed near 0%). Measured in
docs/benchmarks.md, "SFT accuracy, session 7". The whole mix (--config.sft.tasks=add,sub,
mul,word,tool) needs --config.train.seq_len=1024 (a calculator episode's tool list alone is
~700 byte tokens) and far longer training."""

import ml_collections

from configs import tiny
from configs.training import add_training_sections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = tiny.get_config().model
    add_training_sections(config, steps=1200, batch_size=16, seq_len=256, learning_rate=3e-3,
                          warmup_steps=10, checkpoint_every=200, log_every=5)
    config.sft = ml_collections.ConfigDict(dict(
        data="",  # comma-separated JSONL conversation files; "" = the embedded task set
        eval_data="",  # JSONL held-out records with an "answer" (user data); "" = none
        tokenizer="",  # a hub tokenizer.json; "" = the byte-level default
        tasks="add",  # embedded: which tasks (glm_jax.sft.tasks.TASKS), comma-separated
        max_digits=2,  # embedded: digits per operand at most (0 = each task's range, 2-5)
        seed=0,  # embedded task set: which problems
        train_problems=8000,  # embedded: problems for training (each in both modes)
        eval_problems=50,  # embedded: held-out problems (each in both modes)
        eval_every=200,  # steps between evaluations (0 = only before and after training)
        eval_at_start=True,  # evaluate the initial model (the "before" accuracy)
        eval_max_new_tokens=200,  # per assistant turn (a two-digit sum's trace: ~150)
        eval_batch_size=50,  # conversations generated together
        # Distillation: comma-separated teacher checkpoints (workdirs, step folders or
        # converted checkpoints with the student's vocabulary); "" = plain SFT. Every
        # teacher is matched on every record's assistant tokens, with equal weight.
        teachers="",
        distill_temperature=1.0,  # softmax temperature of both sides of the KL (> 0)
        ce_weight=0.0,  # loss = (1 - ce_weight) * KL + ce_weight * next-token CE
    ))
    return config
