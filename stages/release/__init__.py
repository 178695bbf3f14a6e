"""release: what is published, rendered and checked, and where it goes.

``card`` (the published folder of a format: files, model card, Modelfile),
``manifest`` (manifest.json: every file with size and sha256, lineage, params,
tool versions), ``quality`` (the card's quality table, notes and plot),
``lineage`` (what a card and manifest show of a training_lineage.json of any
shape), ``privacy`` (the rules that keep paths, user and host names and secrets
out of what is published, and the final scan of a release folder),
``templates`` (the strict Jinja environment over ``templates/*.j2``) and one
publisher per target kind (``publish_local``, ``publish_hub``) over the plan and
receipt they share (``publish``); ``hub_client`` holds the Hub token, errors,
retries and preflight, ``hub_meta`` the card metadata rules the Hub applies.
"""
