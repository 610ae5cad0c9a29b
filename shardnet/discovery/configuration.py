"""Where a pool finds the Kubernetes API server and its credentials, and how those credentials stay fresh.

Lookup is kubectl's: a kubeconfig file when one is given or exists
(``KUBECONFIG``'s list, else ``~/.kube/config``), else the pod's service
account. Credentials that expire are read again as kubectl would: the
library re-reads a service account's token by itself; a kubeconfig's exec
plugin (``aws eks get-token``, ``gke-gcloud-auth-plugin``, ``kubelogin``),
``tokenFile``, gcp or OIDC user's token is reloaded by
``KubeconfigCredentials``, which the library calls before each request (tokens
only: a client certificate from an exec plugin is read once).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Mapping, Optional

import yaml
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.config.kube_config import KubeConfigLoader

from shardnet.errors import ConfigurationError

logger = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_KUBECONFIG = "~/.kube/config"
# how often a kubeconfig's credentials are read again; the library renews an exec plugin's or gcp/OIDC token
# once it is within five minutes of expiring, so a look every half minute renews it well before it lapses
CREDENTIALS_CHECK_INTERVAL = 30.0
RELOAD_TIMEOUT = 30.0  # seconds a reload (an exec plugin's run) may take before it is given up for this time


class KubeconfigCredentials:
    """A Configuration's ``refresh_api_key_hook``: reloads a kubeconfig user's token at most once per
    ``interval`` seconds, so tokens that expire (exec plugins, ``tokenFile``, gcp, OIDC) are renewed.

    The reload runs beside the requests, never in their way: a plugin that hangs (a login waiting for a
    browser) must not stall discovery while the token held still works. One that fails keeps the token held
    and says why, as one still running after ``reload_timeout`` seconds does (no other starts until it ends);
    the API server's 401s, logged by the watch, follow if the token has lapsed. Only tokens are renewed: the
    library builds its TLS context once, so a plugin that answers with a client certificate keeps its first one.
    """

    def __init__(
        self, loader: KubeConfigLoader, interval: float = CREDENTIALS_CHECK_INTERVAL,
        reload_timeout: float = RELOAD_TIMEOUT,
    ):
        self._loader = loader
        self._interval = interval
        self._reload_timeout = reload_timeout
        self._loaded_at = time.monotonic()
        self._reloading: Optional[asyncio.Task] = None

    async def __call__(self, configuration: k8s_client.Configuration) -> None:
        if self._reloading is not None or time.monotonic() - self._loaded_at < self._interval:
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload(configuration))

    async def close(self, grace: float = 1.0) -> None:
        """Let a reload under way end within ``grace`` seconds (its plugin's process is then reaped), else stop
        it: its client is closing."""
        reloading = self._reloading
        if reloading is not None:
            await asyncio.wait([reloading], timeout=grace)
            reloading.cancel()
            await asyncio.gather(reloading, return_exceptions=True)

    async def _reload(self, configuration: k8s_client.Configuration) -> None:
        # one that takes too long is said and waited for, not given up: the library leaves running a plugin whose
        # read is cancelled, and a reload started again every interval would leave one more hung process each time
        loading = asyncio.ensure_future(self._loader.load_and_set(configuration))
        try:
            if not (await asyncio.wait([loading], timeout=self._reload_timeout))[0]:
                logger.warning("the kubeconfig's credentials took more than %gs to reload; keeping the last ones "
                               "until it ends", self._reload_timeout)
            await loading
        except Exception as error:  # a plugin that fails or a file half written: keep what works for now
            logger.warning("could not reload the kubeconfig's credentials, keeping the last ones: %s", error)
        finally:
            loading.cancel()  # when this reload is itself stopped (its client closes)
            self._loaded_at = time.monotonic()
            self._reloading = None


def _kubeconfig_document(path: str) -> dict:
    """The YAML mapping a kubeconfig file holds; ConfigurationError naming the file when it is none."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigurationError(f"kubeconfig {path} is not readable YAML: {one_line(error)}") from None
    if not isinstance(document, dict):
        raise ConfigurationError(f"kubeconfig {path} is not a kubeconfig (a YAML mapping of clusters, contexts, users)")
    return document


def check_kubeconfig(path: str) -> None:
    """Refuse at once a kubeconfig file that can never work, as kubectl does: missing, not a file, not YAML, or
    naming no current context among its contexts. What may come right later (an exec plugin failing, an API
    server away) is left to the retries; this is not."""
    expanded = os.path.expanduser(path)
    if not os.path.isfile(expanded):
        raise ConfigurationError(
            f"kubeconfig {path}: {'a directory, not a file' if os.path.isdir(expanded) else 'no such file'}"
        )
    document = _kubeconfig_document(path)
    current = document.get("current-context")
    if not current:
        raise ConfigurationError(f"kubeconfig {path} sets no current-context (kubectl config use-context NAME)")
    contexts = [entry.get("name") for entry in document.get("contexts") or [] if isinstance(entry, dict)]
    if current not in contexts:
        raise ConfigurationError(
            f"kubeconfig {path}: current-context {current!r} is not among its contexts "
            f"({', '.join(map(str, contexts)) or 'none'})"
        )


def check_configuration_exists(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse at once, when no kubeconfig file is given, a process with nowhere to find one: no ``KUBECONFIG``,
    no ``~/.kube/config``, and not in a pod (``KUBERNETES_SERVICE_HOST`` unset); or one whose kubeconfig can never
    work, as ``--kubeconfig`` is refused (``check_kubeconfig``). It would retry for ever, never ready. A
    ``KUBECONFIG`` naming a file not written yet is left to the retries; of several files, each must be YAML,
    and the context is looked for in their merge, by the client."""
    files = [entry for entry in environ.get("KUBECONFIG", "").split(os.pathsep) if entry]
    if files:
        present = [entry for entry in files if os.path.isfile(os.path.expanduser(entry))]
        if len(files) == 1 and present:
            check_kubeconfig(present[0])
        for entry in present:
            _kubeconfig_document(entry)
        return
    if environ.get("KUBERNETES_SERVICE_HOST"):
        return
    if not os.path.exists(os.path.expanduser(DEFAULT_KUBECONFIG)):
        raise ConfigurationError(
            f"no Kubernetes configuration: no kubeconfig file at {DEFAULT_KUBECONFIG}, KUBECONFIG unset, and not in "
            "a pod (KUBERNETES_SERVICE_HOST unset); give --kubeconfig FILE"
        )
    check_kubeconfig(DEFAULT_KUBECONFIG)


def one_line(error: Exception) -> str:
    """An error's message on one line (YAML's span several, with the offending text)."""
    return " ".join(str(error).split())


def _kubeconfig_files(kubeconfig: Optional[str], environ: Mapping[str, str]) -> tuple[Optional[str], str]:
    """The kubeconfig files to read (os.pathsep-joined; None when there is none) and what was looked for.

    As kubectl: ``KUBECONFIG``'s missing entries are skipped and, when it is
    set, ``~/.kube/config`` is not consulted.
    """
    if kubeconfig:
        if not os.path.isfile(os.path.expanduser(kubeconfig)):  # as kubectl --kubeconfig: no quiet fallback
            raise k8s_config.ConfigException(f"kubeconfig {kubeconfig}: no such file")
        return kubeconfig, kubeconfig
    listed = environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG
    existing = [path for path in listed.split(os.pathsep) if path and os.path.exists(os.path.expanduser(path))]
    return (os.pathsep.join(existing) or None), listed


async def load_api_client(
    kubeconfig: Optional[str] = None,
    *,
    environ: Mapping[str, str] = os.environ,
    service_account_dir: str = SERVICE_ACCOUNT_DIR,
    credentials_check_interval: float = CREDENTIALS_CHECK_INTERVAL,
) -> k8s_client.ApiClient:
    """An ApiClient configured as kubectl would be, on its own Configuration (no global default).

    Order: the explicit ``kubeconfig`` file; the files of ``KUBECONFIG`` (a
    path list) that exist, else ``~/.kube/config`` if it exists; the
    in-cluster service account when ``KUBERNETES_SERVICE_HOST`` is set. A
    kubeconfig's credentials are read again every ``credentials_check_interval``
    seconds. Raises kubernetes_asyncio's ConfigException naming what was tried
    when none works.
    """
    configuration = type.__call__(k8s_client.Configuration)  # a fresh one, not a copy of the process default
    # the API server's certificate checked as kubectl (Go) checks it, on every Python: 3.13 made its default TLS
    # context strict (VERIFY_X509_STRICT), which refuses a CA whose basicConstraints is not critical or a
    # certificate with no Authority Key Identifier (MicroK8s, clusters years old), and a head that followed such
    # a cluster on 3.12 never synced on 3.13. The chain and the name are verified as before.
    configuration.disable_strict_ssl_verification = True
    config_files, looked_for = _kubeconfig_files(kubeconfig, environ)
    if config_files is None and environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            k8s_config.load_incluster_config(
                client_configuration=configuration,
                environ=environ,
                token_filename=os.path.join(service_account_dir, "token"),
                cert_filename=os.path.join(service_account_dir, "ca.crt"),
            )
        except k8s_config.ConfigException as error:
            raise k8s_config.ConfigException(
                f"in-cluster service account: {error}; and no kubeconfig file at {looked_for}"
            ) from error
        return k8s_client.ApiClient(configuration=configuration)
    if config_files is None:
        raise k8s_config.ConfigException(
            f"no kubeconfig file at {looked_for}, and not in a pod (KUBERNETES_SERVICE_HOST is not set)"
        )
    loader = await k8s_config.load_kube_config(
        config_file=config_files, client_configuration=configuration, persist_config=False
    )
    configuration.refresh_api_key_hook = KubeconfigCredentials(loader, credentials_check_interval)
    return k8s_client.ApiClient(configuration=configuration)
