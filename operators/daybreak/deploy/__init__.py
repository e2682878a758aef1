"""Step 7, deploy: the scoring server that hot-swaps the champion, and the redeploy call that tells it to.
"""

from daybreak.deploy._deploy import DeployResult, deploy_model
from daybreak.deploy._predlog import ONLINE, prune, read_log
from daybreak.deploy._replicas import require_serve, serve_replicated
from daybreak.deploy._serve import serve

__all__ = ["ONLINE", "DeployResult", "deploy_model", "prune", "read_log", "require_serve", "serve",
           "serve_replicated"]
