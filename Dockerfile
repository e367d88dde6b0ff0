# The router's container image, as the Helm chart runs it (helm/kvrouter: command `kvrouter`,
# non-root uid 65532, read-only root filesystem). Build and push (docs/kubernetes.md):
#   docker build -t registry.example.com/kvrouter:0.1.0 . && docker push registry.example.com/kvrouter:0.1.0
# (Not built in this project's CI: the CI machines have no Docker engine.)
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY router router
COPY policies policies
COPY simulator simulator
COPY kvrouter kvrouter
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
# transformers writes caches under HOME; the root filesystem is read-only, so point it at /tmp
# (an emptyDir in the chart) and never reach for a model hub at run time.
ENV HOME=/tmp HF_HOME=/tmp/hf HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["kvrouter"]
CMD ["serve", "--config", "/etc/kvrouter/config.yaml"]
