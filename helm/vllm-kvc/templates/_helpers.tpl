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

{{/* Where everything the server writes goes, so that the root filesystem can be read-only: caches on the cache
volume (cacheDir), configuration and anything else keyed on $HOME in the `home` emptyDir (homeDir), temporary
files in the `tmp` emptyDir. The same variables and layout as the Dockerfiles' ENV. */}}
{{- define "vllm-kvc.writablePathEnv" -}}
{{- $c := .Values.cacheDir | trimSuffix "/" }}
{{- $h := .Values.homeDir | trimSuffix "/" -}}
- name: VLLM_KVC_CACHE
  value: {{ $c | quote }}
- name: HF_HOME
  value: {{ printf "%s/huggingface" $c | quote }}
- name: VLLM_CACHE_ROOT
  value: {{ printf "%s/vllm" $c | quote }}
- name: XDG_CACHE_HOME
  value: {{ printf "%s/xdg" $c | quote }}
- name: TRITON_HOME
  value: {{ printf "%s/triton" $c | quote }}
- name: TRITON_CACHE_DIR
  value: {{ printf "%s/triton/cache" $c | quote }}
- name: TORCHINDUCTOR_CACHE_DIR
  value: {{ printf "%s/torchinductor" $c | quote }}
- name: TORCH_HOME
  value: {{ printf "%s/torch" $c | quote }}
- name: NUMBA_CACHE_DIR
  value: {{ printf "%s/numba" $c | quote }}
- name: OUTLINES_CACHE_DIR
  value: {{ printf "%s/outlines" $c | quote }}
- name: CUDA_CACHE_PATH
  value: {{ printf "%s/nv/ComputeCache" $c | quote }}
- name: FLASHINFER_WORKSPACE_BASE
  value: {{ printf "%s/flashinfer" $c | quote }}
- name: HOME
  value: {{ $h | quote }}
- name: VLLM_CONFIG_ROOT
  value: {{ printf "%s/.config/vllm" $h | quote }}
- name: XDG_CONFIG_HOME
  value: {{ printf "%s/.config" $h | quote }}
- name: TMPDIR
  value: /tmp
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- end }}

{{/* Labels of the `helm test` pod: not the selector labels, so that the Service, the PodDisruptionBudget and the
NetworkPolicy never take it for a server pod. */}}
{{- define "vllm-kvc.testLabels" -}}
helm.sh/chart: {{ include "vllm-kvc.chart" . }}
app.kubernetes.io/name: {{ printf "%s-test" (include "vllm-kvc.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: helm-test
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
{{- $job := (default dict .Values.calibration).job | default dict }}
{{- if and $job.enabled .Values.deployment.compression (not (and .Values.persistence.enabled .Values.persistence.existingClaim)) }}
{{- fail "calibration.job.enabled needs persistence.existingClaim (persistence.enabled=true): the pre-install hook Job runs before this chart creates its own claim, and its artifacts must land on the volume the server pods mount (a ReadWriteMany claim shared by the replicas; with a ReadWriteOnce claim use calibration.initContainer)" }}
{{- end }}
{{- end }}

{{/* Whether there is anything to calibrate: `vllm-kvc compress` exits 2 ("nothing to compress") without a
compression block, so the calibration init container and Job are rendered only with one. */}}
{{- define "vllm-kvc.hasCompression" -}}
{{- if .Values.deployment.compression }}true{{ end }}
{{- end }}

{{/* resources of the server container and of the calibration containers: .Values.resources plus the GPUs. */}}
{{- define "vllm-kvc.resources" -}}
{{- $res := deepCopy (default dict .Values.resources) }}
{{- if .Values.gpu.enabled }}
{{- $limits := default dict (index $res "limits") }}
{{- $_ := set $limits .Values.gpu.resourceName (int .Values.gpu.count) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* volumeMounts of the server container and of the calibration containers. */}}
{{- define "vllm-kvc.volumeMounts" -}}
- name: config
  mountPath: /etc/vllm-kvc
  readOnly: true
- name: cache
  mountPath: {{ .Values.cacheDir }}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: {{ .Values.homeDir }}
{{- if .Values.shm.enabled }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The volumes behind vllm-kvc.volumeMounts. Called with (dict "ctx" $ "configMap" <name>). */}}
{{- define "vllm-kvc.volumes" -}}
{{- $v := .ctx.Values -}}
- name: config
  configMap:
    name: {{ .configMap }}
- name: cache
  {{- if $v.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "vllm-kvc.pvcName" .ctx }}
  {{- else }}
  emptyDir: {}
  {{- end }}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- if $v.shm.enabled }}
- name: dshm
  emptyDir:
    medium: Memory
    {{- with $v.shm.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}
{{- with $v.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Environment of the server container and of the calibration containers. Called with
(dict "ctx" $ "apiKey" <bool>): the calibration containers get the same list less VLLM_API_KEY (compress serves
nothing). */}}
{{- define "vllm-kvc.env" -}}
{{- $v := .ctx.Values -}}
{{ include "vllm-kvc.writablePathEnv" .ctx }}
{{- if and .apiKey $v.apiKey.existingSecret }}
- name: VLLM_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $v.apiKey.existingSecret }}
      key: {{ $v.apiKey.key }}
{{- end }}
{{- if $v.hfToken.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $v.hfToken.existingSecret }}
      key: {{ $v.hfToken.key }}
{{- end }}
{{- with $v.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The container that calibrates ahead of serving (`vllm-kvc compress`): the server's image, config,
volumes, environment, resources and security context. Used as the pod's init container and by the hook Job.
It downloads/converts the model and writes the method's artifacts (factor files, dictionaries, sharing
groups) to the cache volume, atomically and under a lock; when they are already there it exits 0 at once. */}}
{{- define "vllm-kvc.calibrateContainer" -}}
- name: calibrate
  image: {{ include "vllm-kvc.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["vllm-kvc"]
  args:
    - compress
    - --config
    - /etc/vllm-kvc/deployment.yaml
  env:
    {{- include "vllm-kvc.env" (dict "ctx" . "apiKey" false) | nindent 4 }}
  {{- with .Values.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  resources:
    {{- include "vllm-kvc.resources" . | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    {{- include "vllm-kvc.volumeMounts" . | nindent 4 }}
{{- end }}

{{/* Labels of the calibration hook Job's pod: not the selector labels (the Service, PodDisruptionBudget and
NetworkPolicy must not take it for a server pod). */}}
{{- define "vllm-kvc.calibrationLabels" -}}
helm.sh/chart: {{ include "vllm-kvc.chart" . }}
app.kubernetes.io/name: {{ printf "%s-calibration" (include "vllm-kvc.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ (default .Chart.AppVersion .Values.image.tag) | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: calibration
{{- end }}
