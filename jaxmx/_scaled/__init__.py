"""Block-scaled formats beyond OCP MX: private numerics the generalized core builds on."""
