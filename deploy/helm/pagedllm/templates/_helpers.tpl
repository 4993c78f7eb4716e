{{- define "pagedllm.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pagedllm.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pagedllm.labels" -}}
app.kubernetes.io/name: {{ include "pagedllm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pagedllm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pagedllm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The prefix of the series the adapter reads (pagedllm unless only vllm: names exist). */}}
{{- define "pagedllm.metricPrefix" -}}
{{- if eq .Values.metricsPrefix "vllm" -}}vllm{{- else -}}pagedllm{{- end -}}
{{- end -}}
