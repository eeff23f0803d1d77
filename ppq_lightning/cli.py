"""The ``ppq`` command: LightningCLI over any LightningModule and datamodule.

``ppq validate --config configs/llm/smollm2_p_then_q.yaml`` compresses the model with the
callbacks of the config (list order is compression order) and evaluates it.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the ``ppq`` command line (``fit``, ``validate``, ``test``, ``predict``).

    Args:
        args: command-line arguments; None reads ``sys.argv``.
    """
    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
