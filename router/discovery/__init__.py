"""The discovery room: which backends exist. ``backend_set`` diffs snapshots into changes for the
pool; the sources are static config, DNS of a headless Service (``dns``) and the Kubernetes API
(``k8s`` over ``kube_client``).
"""
