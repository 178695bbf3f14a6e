"""release: what is published, rendered and checked, and where it goes.

``card`` (the published folder of a format: files, model card, Modelfile),
``manifest`` (manifest.json: every file with size and sha256, lineage, params,
tool versions), ``quality`` (the card's quality table, notes and plot),
``templates`` (the strict Jinja environment over ``templates/*.j2``) and one
publisher per target kind (``publish_local``, ``publish_hub``) over the plan and
receipt they share (``publish``); ``hub_client`` holds the Hub token, errors,
retries and preflight, ``hub_meta`` the card metadata rules the Hub applies.
"""
