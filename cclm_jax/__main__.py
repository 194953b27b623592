from cclm_jax.main import run

run()
