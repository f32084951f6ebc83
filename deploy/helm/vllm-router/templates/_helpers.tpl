{{- define "vllm-router.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vllm-router.fullname" -}}
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

{{- define "vllm-router.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vllm-router.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vllm-router.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "vllm-router.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* servers.toml from config.servers and config.settings (or config.raw). Values are
written with toJson, whose strings, numbers and booleans are valid TOML. */}}
{{- define "vllm-router.serversToml" -}}
{{- if .Values.config.raw -}}
{{ .Values.config.raw }}
{{- else -}}
[servers]
servers = [
{{- range .Values.config.servers }}
{{- $pairs := list }}
{{- range $k, $v := . }}
{{- $pairs = append $pairs (printf "%s = %s" $k (toJson $v)) }}
{{- end }}
  { {{ join ", " $pairs }} },
{{- end }}
]
# [config]: docs/configuration.md; keys not set here take their defaults.
[config]
{{- range $k, $v := .Values.config.settings }}
{{ $k }} = {{ toJson $v }}
{{- end }}
{{- end }}
{{- end }}
