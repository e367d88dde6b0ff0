{{/* Names and labels shared by every object of the chart. */}}

{{- define "kvrouter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvrouter.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kvrouter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvrouter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvrouter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kvrouter.labels" -}}
helm.sh/chart: {{ include "kvrouter.chart" . }}
{{ include "kvrouter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: router
{{- end }}

{{- define "kvrouter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kvrouter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespace discovery watches: the configured one, else the release's. */}}
{{- define "kvrouter.discoveryNamespace" -}}
{{- $k8s := ((.Values.config.discovery | default dict).kubernetes | default dict) }}
{{- default .Release.Namespace $k8s.namespace }}
{{- end }}

{{- define "kvrouter.discoveryMode" -}}
{{- ((.Values.config.discovery | default dict).mode | default "static") }}
{{- end }}

{{/* The router config as rendered into the ConfigMap: the values' `config`, with the
     Kubernetes discovery namespace filled in (the router itself never guesses it). */}}
{{/* Replica sync is on when replicaSync.enabled and there can be more than one replica. */}}
{{- define "kvrouter.syncActive" -}}
{{- if and .Values.replicaSync.enabled (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) }}true{{- end }}
{{- end }}

{{/* Warm start is on when sync is and replicaSync.warmStart or config.sync.warm_start.enabled. */}}
{{- define "kvrouter.warmStartActive" -}}
{{- $warm := ((.Values.config.sync | default dict).warm_start | default dict) }}
{{- if and (include "kvrouter.syncActive" .) (hasKey $warm "enabled" | ternary $warm.enabled .Values.replicaSync.warmStart) }}true{{- end }}
{{- end }}

{{- define "kvrouter.peersService" -}}
{{- printf "%s-peers" (include "kvrouter.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvrouter.config" -}}
{{- $config := deepCopy .Values.config }}
{{- if include "kvrouter.syncActive" . }}
{{- /* The replicas find each other through the headless peers Service; keys set in
       config.sync win. */}}
{{- $sync := get $config "sync" | default dict }}
{{- $_ := set $sync "enabled" (hasKey $sync "enabled" | ternary $sync.enabled true) }}
{{- $_ := set $sync "port" ($sync.port | default .Values.replicaSync.port) }}
{{- $dns := printf "%s.%s.svc.%s" (include "kvrouter.peersService" .) .Release.Namespace .Values.replicaSync.clusterDomain }}
{{- $_ := set $sync "dns_name" ($sync.dns_name | default $dns) }}
{{- if and .Values.replicaSync.warmStart (not (hasKey $sync "warm_start")) }}
{{- if not ((.Values.config.server | default dict).admin_token) }}
{{- fail "replicaSync.warmStart needs config.server.admin_token (the same on every replica): siblings hand out their index only with it" }}
{{- end }}
{{- $_ := set $sync "warm_start" (dict "enabled" true) }}
{{- end }}
{{- $_ := set $config "sync" $sync }}
{{- end }}
{{- if eq (include "kvrouter.discoveryMode" .) "kubernetes" }}
{{- $discovery := get $config "discovery" }}
{{- $k8s := get $discovery "kubernetes" | default dict }}
{{- $_ := set $k8s "namespace" (include "kvrouter.discoveryNamespace" .) }}
{{- $_ := set $discovery "kubernetes" $k8s }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{- define "kvrouter.port" -}}
{{- ((.Values.config.server | default dict).port | default 8080) }}
{{- end }}
