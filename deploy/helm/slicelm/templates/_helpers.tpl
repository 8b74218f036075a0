{{/*
Names and labels follow vllm-project/production-stack's chart so its dashboards, label selectors and
scripts keep working: Deployment "{release}-{model}-deployment-vllm" with labels `model` and
`helm-release-name`, Service "{release}-{model}-engine-service", router "{release}-deployment-router".
*/}}

{{- define "slicelm.engineDeploymentName" -}}
{{ printf "%s-%s-deployment-vllm" .root.Release.Name .model.name }}
{{- end }}

{{- define "slicelm.engineServiceName" -}}
{{ printf "%s-%s-engine-service" .root.Release.Name .model.name }}
{{- end }}

{{- define "slicelm.routerName" -}}
{{ printf "%s-deployment-router" .Release.Name }}
{{- end }}

{{- define "slicelm.routerServiceName" -}}
{{ printf "%s-router-service" .Release.Name }}
{{- end }}

{{- define "slicelm.routerServiceAccount" -}}
{{ .Values.routerSpec.serviceAccountName | default (printf "%s-router-service-account" .Release.Name) }}
{{- end }}

{{/* Labels every object carries (beside app.kubernetes.io/instance, which selectors carry). */}}
{{- define "slicelm.commonLabels" -}}
app.kubernetes.io/part-of: {{ .Chart.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* What selects one model's engine pods (stable across upgrades). */}}
{{- define "slicelm.engineSelectorLabels" -}}
model: {{ .model.name }}
helm-release-name: {{ .root.Release.Name }}
app.kubernetes.io/component: serving-engine
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end }}

{{/* What selects every engine pod of the release: the router's k8s discovery uses it. */}}
{{- define "slicelm.engineDiscoverySelector" -}}
{{- $sel := list "app.kubernetes.io/component=serving-engine" (printf "helm-release-name=%s" .Release.Name) -}}
{{- range $k, $v := .Values.servingEngineSpec.labels | default dict }}
{{- $sel = append $sel (printf "%s=%s" $k $v) -}}
{{- end }}
{{- join "," $sel -}}
{{- end }}

{{- define "slicelm.engineLabels" -}}
{{ include "slicelm.engineSelectorLabels" . }}
app.kubernetes.io/name: {{ .model.name }}
{{ include "slicelm.commonLabels" .root }}
{{- with .root.Values.servingEngineSpec.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "slicelm.routerSelectorLabels" -}}
app.kubernetes.io/name: router
app.kubernetes.io/component: router
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "slicelm.routerLabels" -}}
{{ include "slicelm.routerSelectorLabels" . }}
{{ include "slicelm.commonLabels" . }}
{{- with .Values.routerSpec.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The slicelm image: `image.repository` : `image.tag` (default the chart's appVersion) with the variant
suffix, "-cuda" for engines that get a GPU and "-cpu" for CPU engines and the router (the Dockerfile's
VARIANT build argument). production-stack's modelSpec.repository/tag name a vLLM image and are not used.
Usage: include "slicelm.image" (dict "root" $ "variant" "cuda")
*/}}
{{- define "slicelm.image" -}}
{{- $img := .root.Values.image | default dict -}}
{{- $repo := $img.repository | default "ghcr.io/slicelm/slicelm" -}}
{{- $tag := $img.tag | default .root.Chart.AppVersion | toString -}}
{{ printf "%s:%s-%s" $repo $tag .variant }}
{{- end }}

{{- define "slicelm.imagePullPolicy" -}}
{{- $img := .Values.image | default dict -}}
{{ $img.pullPolicy | default .Values.servingEngineSpec.imagePullPolicy | default "IfNotPresent" }}
{{- end }}

{{/* A whole number as Kubernetes wants it (never 1e+06): values arrive as float64 or string. */}}
{{- define "slicelm.whole" -}}
{{- if kindIs "string" . -}}{{ . }}{{- else -}}{{ int64 . }}{{- end -}}
{{- end }}

{{/*
Physical GPUs one replica takes, as `slicelm up` counts them (slicelm/stack/requests.py gpu_count):
requestGPU (or limitGPU); a memory / cores request alone implies one (HAMi's default GPU number).
*/}}
{{- define "slicelm.gpuCount" -}}
{{- $m := . -}}
{{- $n := int (default 0 (hasKey $m "requestGPU" | ternary $m.requestGPU $m.limitGPU)) -}}
{{- if and (eq $n 0) (or (hasKey $m "requestGPUMem") (hasKey $m "limitGPUMem") (hasKey $m "requestGPUMemPercentage") (hasKey $m "limitGPUMemPercentage") (hasKey $m "requestGPUCores") (hasKey $m "limitGPUCores")) -}}
{{- $n = 1 -}}
{{- end -}}
{{ $n }}
{{- end }}

{{/*
--tensor-parallel-size of one replica, as `slicelm up` derives it (slicelm/stack/spec.py
ModelSpec.tensor_parallel_size): vllmConfig.tensorParallelSize (production-stack's key), else requestGPU
(or limitGPU) when above 1; validate.yaml makes the two agree.
*/}}
{{- define "slicelm.tensorParallelSize" -}}
{{- $m := . -}}
{{- $tp := 0 -}}
{{- if kindIs "map" $m.vllmConfig }}{{ $tp = int (default 0 $m.vllmConfig.tensorParallelSize) }}{{ end -}}
{{- if eq $tp 0 }}{{ $tp = int (default 1 (hasKey $m "requestGPU" | ternary $m.requestGPU $m.limitGPU)) }}{{ end -}}
{{ max $tp 1 }}
{{- end }}

{{- define "slicelm.device" -}}
{{- $slicelm := .root.Values.slicelm | default dict -}}
{{- if and (gt (int (include "slicelm.gpuCount" .model)) 0) (ne ($slicelm.device | default "auto") "cpu") -}}
cuda
{{- else -}}
cpu
{{- end -}}
{{- end }}

{{/*
Resources exactly as production-stack renders them (its helm/templates/_helpers.tpl "chart.resources"):
requestGPU -> `nvidia.com/gpu` (or requestGPUType as the resource name) in requests and limits;
HAMi's requestGPUMem / requestGPUMemPercentage / requestGPUCores -> nvidia.com/gpumem,
nvidia.com/gpumem-percentage, nvidia.com/gpucores in requests, the limit* twins in limits.
CPU and memory requests are optional here (CPU-only stacks).
*/}}
{{- define "slicelm.resources" -}}
{{- $m := . -}}
{{- $gpu := int (default 0 $m.requestGPU) -}}
{{- $gpuType := default "nvidia.com/gpu" $m.requestGPUType -}}
requests:
  {{- if hasKey $m "requestMemory" }}
  memory: {{ $m.requestMemory | quote }}
  {{- end }}
  {{- if hasKey $m "requestCPU" }}
  cpu: {{ $m.requestCPU | quote }}
  {{- end }}
  {{- if gt $gpu 0 }}
  {{ $gpuType }}: {{ include "slicelm.whole" $m.requestGPU | quote }}
  {{- end }}
  {{- if hasKey $m "requestGPUMem" }}
  nvidia.com/gpumem: {{ include "slicelm.whole" $m.requestGPUMem | quote }}
  {{- end }}
  {{- if hasKey $m "requestGPUMemPercentage" }}
  nvidia.com/gpumem-percentage: {{ include "slicelm.whole" $m.requestGPUMemPercentage | quote }}
  {{- end }}
  {{- if hasKey $m "requestGPUCores" }}
  nvidia.com/gpucores: {{ include "slicelm.whole" $m.requestGPUCores | quote }}
  {{- end }}
{{- if or (hasKey $m "limitMemory") (hasKey $m "limitCPU") (gt $gpu 0) (hasKey $m "limitGPUMem") (hasKey $m "limitGPUMemPercentage") (hasKey $m "limitGPUCores") }}
limits:
  {{- if hasKey $m "limitMemory" }}
  memory: {{ $m.limitMemory | quote }}
  {{- end }}
  {{- if hasKey $m "limitCPU" }}
  cpu: {{ $m.limitCPU | quote }}
  {{- end }}
  {{- if gt $gpu 0 }}
  {{ $gpuType }}: {{ include "slicelm.whole" $m.requestGPU | quote }}
  {{- end }}
  {{- if hasKey $m "limitGPUMem" }}
  nvidia.com/gpumem: {{ include "slicelm.whole" $m.limitGPUMem | quote }}
  {{- end }}
  {{- if hasKey $m "limitGPUMemPercentage" }}
  nvidia.com/gpumem-percentage: {{ include "slicelm.whole" $m.limitGPUMemPercentage | quote }}
  {{- end }}
  {{- if hasKey $m "limitGPUCores" }}
  nvidia.com/gpucores: {{ include "slicelm.whole" $m.limitGPUCores | quote }}
  {{- end }}
{{- end }}
{{- end }}

{{/* The first name a replica serves (its metrics' model_name): --served-model-name in extraArgs, else modelURL. */}}
{{- define "slicelm.servedName" -}}
{{- $extra := list -}}
{{- if kindIs "map" .vllmConfig }}{{ $extra = .vllmConfig.extraArgs | default list }}{{ end -}}
{{- $name := .modelURL -}}
{{- $next := false -}}
{{- range $extra -}}
{{- $a := toString . -}}
{{- if $next }}{{ $name = $a }}{{ $next = false }}{{ end -}}
{{- if eq $a "--served-model-name" }}{{ $next = true }}{{ end -}}
{{- if hasPrefix "--served-model-name=" $a }}{{ $name = trimPrefix "--served-model-name=" $a }}{{ end -}}
{{- end -}}
{{ $name }}
{{- end }}

{{/*
`slicelm serve` arguments of one modelSpec: the same mapping as `slicelm up`
(slicelm/stack/serve_args.py serve_command, with host 0.0.0.0, the container port and no memory budget
flag: under HAMi the engine reads its slice from HAMi-core's CUDA_DEVICE_MEMORY_LIMIT_<i>).
tests/deploy/test_chart_render.py keeps the two equal. Usage: include "slicelm.serveArgs" (dict "root" $ "model" $m)
*/}}
{{- define "slicelm.serveArgs" -}}
{{- $m := .model -}}
{{- $extra := list -}}
{{- $vc := dict -}}
{{- $hasVc := kindIs "map" $m.vllmConfig -}}
{{- if $hasVc }}{{ $vc = $m.vllmConfig }}{{ $extra = $vc.extraArgs | default list }}{{ end -}}
{{- $named := false -}}
{{- range $extra }}{{ if or (eq (toString .) "--served-model-name") (hasPrefix "--served-model-name=" (toString .)) }}{{ $named = true }}{{ end }}{{ end -}}
- serve
- {{ $m.modelURL | quote }}
- "--host"
- "0.0.0.0"
- "--port"
- {{ include "slicelm.containerPort" .root | quote }}
- "--device"
- {{ include "slicelm.device" . | quote }}
{{- if not $named }}
- "--served-model-name"
- {{ $m.modelURL | quote }}
{{- end }}
{{- $tp := include "slicelm.tensorParallelSize" $m | int }}
{{- if gt $tp 1 }}
- "--tensor-parallel-size"
- {{ $tp | toString | quote }}
{{- end }}
{{- if $hasVc }}
{{- if $vc.enablePrefixCaching }}
- "--enable-prefix-caching"
{{- else }}
- "--no-enable-prefix-caching"
{{- end }}
{{- if not (kindIs "invalid" $vc.maxModelLen) }}
- "--max-model-len"
- {{ include "slicelm.whole" $vc.maxModelLen | quote }}
{{- end }}
{{- if not (kindIs "invalid" $vc.dtype) }}
- "--dtype"
- {{ $vc.dtype | quote }}
{{- end }}
{{- if not (kindIs "invalid" $vc.maxNumSeqs) }}
- "--max-num-seqs"
- {{ include "slicelm.whole" $vc.maxNumSeqs | quote }}
{{- end }}
{{- if not (kindIs "invalid" $vc.gpuMemoryUtilization) }}
- "--gpu-memory-utilization"
- {{ $vc.gpuMemoryUtilization | toString | quote }}
{{- end }}
{{- if not (kindIs "invalid" $vc.runner) }}
- "--runner"
- {{ $vc.runner | quote }}
{{- end }}
{{- if has $vc.convert (list "embed" "classify") }}
- "--task"
- {{ eq $vc.convert "embed" | ternary "embed" "score" | quote }}
{{- end }}
{{- end }}
{{- if $m.chatTemplate }}
- "--chat-template"
- {{ $m.chatTemplateConfigMap | ternary (printf "/templates/%s" $m.chatTemplate) $m.chatTemplate | quote }}
{{- end }}
{{- if $m.enableTool }}
- "--enable-auto-tool-choice"
{{- end }}
{{- if $m.toolCallParser }}
- "--tool-call-parser"
- {{ $m.toolCallParser | quote }}
{{- end }}
{{- range $extra }}
- {{ toString . | quote }}
{{- end }}
{{- end }}

{{- define "slicelm.containerPort" -}}
{{ include "slicelm.whole" (.Values.servingEngineSpec.containerPort | default 8000) }}
{{- end }}

{{- define "slicelm.servicePort" -}}
{{ include "slicelm.whole" (.Values.servingEngineSpec.servicePort | default (include "slicelm.containerPort" . | int)) }}
{{- end }}

{{/*
Probes on /health. The startup probe is sized for model loading (60 x 10 s, as production-stack);
servingEngineSpec.startupProbe / livenessProbe / readinessProbe override field by field.
*/}}
{{- define "slicelm.engineProbes" -}}
{{- $get := dict "httpGet" (dict "path" "/health" "port" "container-port") -}}
{{- $startup := merge (dict "initialDelaySeconds" 15 "periodSeconds" 10 "failureThreshold" 60) $get -}}
{{- $live := merge (dict "periodSeconds" 10 "failureThreshold" 3 "timeoutSeconds" 5) (deepCopy $get) -}}
{{- $ready := merge (dict "periodSeconds" 5 "failureThreshold" 3 "timeoutSeconds" 5) (deepCopy $get) -}}
{{- $se := .Values.servingEngineSpec -}}
startupProbe:
  {{- toYaml (mergeOverwrite $startup ($se.startupProbe | default dict)) | nindent 2 }}
livenessProbe:
  {{- toYaml (mergeOverwrite $live ($se.livenessProbe | default dict)) | nindent 2 }}
readinessProbe:
  {{- toYaml (mergeOverwrite $ready ($se.readinessProbe | default dict)) | nindent 2 }}
{{- end }}

{{- define "slicelm.routerPort" -}}
{{ include "slicelm.whole" ((.Values.routerSpec | default dict).containerPort | default 8000) }}
{{- end }}

{{- define "slicelm.routerServicePort" -}}
{{ include "slicelm.whole" ((.Values.routerSpec | default dict).servicePort | default 80) }}
{{- end }}

{{- define "slicelm.releaseLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "slicelm.commonLabels" . }}
{{- end }}
