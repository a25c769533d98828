"""Simulations that show whether, and how well, a policy learns: worlds with hidden rates
played in process through the Rust core (`inprocess`) or against a running server through
the client SDK (`e2e`), summarised as tables (`metrics`, `report`) and PNG plots."""
