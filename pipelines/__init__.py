"""Top layer of ogpsa: the `ogpsa` command, LLaMA-Factory activation, the SFT->DPO recipe runner,
evaluation and reports. Import-light on purpose (imported at interpreter start-up by the `.pth`)."""


def activate() -> None:
    """Install the LLaMA-Factory integration in this process.

    The installed `ogpsa_activate.pth` does this at every start-up; call it yourself when the
    package was installed without that file (an editable install) and you drive LLaMA-Factory
    from Python, before `llamafactory.train.tuner.run_exp(...)`.
    """
    from .activation import arm

    arm()
