"""Writing checkpoint files by hand, for the tests that damage or edit them."""

from jaxmx.checkpoint._orbax import _nest


def orbax_write(path, manifest: dict, arrays: dict) -> None:
    """Rewrites an orbax checkpoint with orbax itself: its own records agree with the arrays."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
        c.save(
            path,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(_nest(arrays)), jaxmx=ocp.args.JsonSave(manifest)
            ),
            force=True,
        )
