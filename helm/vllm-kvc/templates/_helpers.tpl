{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "vllm-kvc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: <release>-<chart>, or the release name if it already contains the chart name. */}}
{{- define "vllm-kvc.fullname" -}}
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

{{- define "vllm-kvc.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "vllm-kvc.labels" -}}
helm.sh/chart: {{ include "vllm-kvc.chart" . }}
{{ include "vllm-kvc.selectorLabels" . }}
app.kubernetes.io/version: {{ (default .Chart.AppVersion .Values.image.tag) | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: inference-server
{{- end }}

{{/* Immutable selector labels (Deployment selector, Service selector, PDB, ServiceMonitor). */}}
{{- define "vllm-kvc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vllm-kvc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vllm-kvc.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vllm-kvc.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "vllm-kvc.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}

{{- define "vllm-kvc.pvcName" -}}
{{- default (printf "%s-cache" (include "vllm-kvc.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/* The deployment config file rendered from .Values.deployment. */}}
{{- define "vllm-kvc.deploymentConfig" -}}
{{- toYaml .Values.deployment }}
{{- end }}

{{/* Render-time checks that the values schema cannot express. */}}
{{- define "vllm-kvc.validate" -}}
{{- $engine := default dict .Values.deployment.engine }}
{{- $tp := int (default 1 (index $engine "tensor_parallel_size")) }}
{{- $pp := int (default 1 (index $engine "pipeline_parallel_size")) }}
{{- if and .Values.gpu.enabled (lt (int .Values.gpu.count) (mul $tp $pp)) }}
{{- fail (printf "gpu.count (%d) must be >= deployment.engine.tensor_parallel_size x pipeline_parallel_size (%d x %d)" (int .Values.gpu.count) $tp $pp) }}
{{- end }}
{{- if and (gt (int .Values.replicaCount) 1) .Values.persistence.enabled (not .Values.persistence.existingClaim) (not (has "ReadWriteMany" .Values.persistence.accessModes)) }}
{{- fail "replicaCount > 1 shares one cache claim: set persistence.accessModes to [ReadWriteMany], use persistence.existingClaim, or disable persistence" }}
{{- end }}
{{- end }}
