"""Top layer of ogpsa: the `ogpsa` command, the SFT->DPO recipe runner, evaluation and reports;
`integration/` holds everything that touches LLaMA-Factory's internals. Import-light on purpose (imported at interpreter start-up by the `.pth`)."""


def activate() -> None:
    """Install the LLaMA-Factory integration in this process.

    The installed `ogpsa_activate.pth` does this at every start-up; call it yourself when the
    package was installed without that file (an editable install) and you drive LLaMA-Factory
    from Python, before `llamafactory.train.tuner.run_exp(...)`.
    """
    from .integration.hook import arm

    arm()
