"""sharing: the DVC remote through which machines share what they built.

``remote`` probes it before a command relies on it (has data, empty or
unreachable: one line, in seconds, instead of DVC's error after its retries);
``dvc`` runs the dvc commands the make targets are made of and reads what DVC
says; ``build`` runs the pipeline pulling from the remote whatever it already
has (``make demo``, ``make push``); ``upkeep`` shares to it and collects
garbage (``make share``, ``make gc``).  No DVC stage imports this folder.
"""
