"""config: params.yaml, validated.

``params`` holds the schema (pydantic v2 models, frozen, unknown keys refused)
and :func:`~stages.config.params.load_params`, which every stage calls first so
a bad key fails before any work, named by its dotted path; ``evaluate`` the
``evaluate:`` section (fidelity checks and their thresholds); ``hub`` what the
Hub takes (license ids, its file size limit); ``pipeline`` the stage sets of
``pipeline.yaml`` (which trainers each group of stages loops over, and the
check that the file is current); ``base`` the shared base class,
strict field types and the one error formatter.  A folder of
its own, not part of ``core``, so that a stage which reads no params (the merge)
does not rerun when a params message changes.
"""
