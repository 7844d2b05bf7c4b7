"""Placeholder main job until the training issue lands: runs the SPEC §1 recurrence
three ways and prints their differences."""
import jax
import jax.numpy as jnp

import tttla_jax as tt


def main():
    key = jax.random.PRNGKey(0)
    kq, kk, kv, kg = jax.random.split(key, 4)
    B, T, H, K, V = 2, 1000, 4, 32, 32
    q = jax.random.normal(kq, (B, T, H, K))
    k = jax.random.normal(kk, (B, T, H, K)) / K ** 0.5
    v = jax.random.normal(kv, (B, T, H, V))
    g = -jax.nn.softplus(jax.random.normal(kg, (B, T, H)))
    outs = {impl: tt.linear_attention(q, k, v, log_decay=g, impl=impl, output_final_state=True)
            for impl in ("recurrent", "associative", "chunked")}
    for impl, (o, S) in outs.items():
        d = float(jnp.abs(o - outs["recurrent"][0]).max())
        print(f"{impl:12s} max |o - o_recurrent| = {d:.2e}")


if __name__ == "__main__":
    main()
