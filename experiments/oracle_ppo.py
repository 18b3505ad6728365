"""PPO with the world's gold judge as its reward (an oracle RM): how far PPO itself gets, RM errors aside.

    python experiments/oracle_ppo.py --sft runs/sft/ckpt.pt --rm runs/rm/ckpt.pt \\
        --prompts runs/world/ppo_prompts.jsonl --out-dir runs/oracle --total-episodes 10240 --kl-coef 0.1 \\
        --save-interval 40 --keep-saves
    python experiments/accuracy.py runs/oracle/ckpt_*.pt --prompts runs/world/test_prompts.jsonl

Every option is ppo.py's. The RM checkpoint is still loaded (the value model starts from it), but step 2
scores each response with the gold score, centred at CENTER and scaled by SCALE to about the RM's
normalised range, and a response that never ended gets --unended-score as in ppo.py. With --keep-saves
each save is also kept as ckpt_<iteration>.pt, so accuracy can be followed along training.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ppo  # noqa: E402
from data.formats import load_prompts  # noqa: E402
from data.judge import gold_score  # noqa: E402
from sampling import decode_response, unended_rule  # noqa: E402

CENTER, SCALE = 0.6, 4.0
current = {}  # the batch being scored: its prompt indices and the tokenizer

shuffled_indices, rollout = ppo.shuffled_indices, ppo.rollout


def batch_indices(*args, **kwargs):
    current["batch"] = shuffled_indices(*args, **kwargs)
    return current["batch"]


def rollout_keeping_tok(policy, queries, tok, *args):
    current["tok"] = tok
    return rollout(policy, queries, tok, *args)


def gold_reward(reward_model, ro, cfg, d):
    if "prompts" not in current:
        current["prompts"] = load_prompts(cfg.prompts)
    texts = [decode_response(current["tok"], r) for r in ro.seq[:, ro.n_query:].tolist()]
    gold = torch.tensor([gold_score(current["prompts"][i], t) for i, t in zip(current["batch"], texts)])
    return unended_rule((gold - CENTER) * SCALE, ro.ended.cpu(), cfg.unended_score).to(ro.seq.device)


if __name__ == "__main__":
    ppo.shuffled_indices, ppo.rollout, ppo.score = batch_indices, rollout_keeping_tok, gold_reward
    sys.argv[0] = "ppo.py"
    ppo.cli(ppo.main)
