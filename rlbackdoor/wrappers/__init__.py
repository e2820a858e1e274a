"""Wrappers that put an attack into environments: one Gymnasium env, an SB3 VecEnv, a PettingZoo env."""
