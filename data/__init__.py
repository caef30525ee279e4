"""The project's data: prompt sets with their licences (see README.md here).

This folder is the top-level ``data/`` of a checkout and is installed as the package ``rlaif.data``
(pyproject.toml maps one to the other), so ``importlib.resources.files("rlaif.data")`` finds the same files
in an editable install and in a wheel. ``rlaif.prompts`` names them: ``--prompts parti`` and the others in
``rlaif.prompts.PROMPT_SETS``.
"""
