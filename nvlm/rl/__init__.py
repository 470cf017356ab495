"""Reinforcement learning after SFT: GRPO on verifiable rewards and DPO on preference pairs, for NVLM-D, -X and -H.

The paper stops at SFT (§4.5); these stages continue from its checkpoint. Rollouts run on nvlm's own inference
runner over the training model's weights in memory, with the prompt encoded once by the training processor,
so the tokens and images a completion was sampled from are the ones the loss sees.
"""
