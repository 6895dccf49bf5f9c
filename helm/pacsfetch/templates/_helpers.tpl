{{/* Labels of every object; "component" says which process. */}}
{{- define "pacsfetch.labels" -}}
app.kubernetes.io/name: pacsfetch
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/component: {{ .component }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end }}

{{- define "pacsfetch.selector" -}}
app.kubernetes.io/name: pacsfetch
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The Secret holding the environment of every pacsfetch container, if any. */}}
{{- define "pacsfetch.secretName" -}}
{{- if .Values.secrets.existingSecret -}}
{{ .Values.secrets.existingSecret }}
{{- else if .Values.secrets.values -}}
{{ .Release.Name }}-env
{{- end -}}
{{- end }}

{{/* Environment: the config file, the broker URL, the secrets. */}}
{{- define "pacsfetch.env" -}}
env:
  - name: PACSFETCH_CONFIG
    value: /etc/pacsfetch/pacsfetch.toml
  - name: PACSFETCH_BROKER_URL
    {{- if .Values.redis.internal }}
    value: {{ printf "redis://%s-redis:6379/0" .Release.Name | quote }}
    {{- else }}
    valueFrom:
      secretKeyRef:
        name: {{ required "redis.external.existingSecret is required when redis.internal is false" .Values.redis.external.existingSecret }}
        key: {{ .Values.redis.external.key }}
    {{- end }}
{{- with include "pacsfetch.secretName" . }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
{{- end }}

{{/* The container's security context and mounts shared by every pacsfetch process. */}}
{{- define "pacsfetch.container" -}}
image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
{{ include "pacsfetch.env" . }}
{{- end }}

{{- define "pacsfetch.mounts" -}}
volumeMounts:
  - name: config
    mountPath: /etc/pacsfetch/pacsfetch.toml
    subPath: pacsfetch.toml
    readOnly: true
  - name: tmp
    mountPath: /tmp
  {{- if .data }}
  {{- if .root.Values.storage.claimName }}
  - name: data
    mountPath: /data
  {{- end }}
  {{- end }}
  {{- if .root.Values.tls.secretName }}
  - name: tls
    mountPath: /etc/pacsfetch/tls
    readOnly: true
  {{- end }}
{{- end }}

{{/* Pod-level settings shared by every pacsfetch process. */}}
{{- define "pacsfetch.pod" -}}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  - name: config
    configMap:
      name: {{ .root.Release.Name }}-config
  # The spool (pynetdicom writes each incoming data set there first); the root stays read-only.
  - name: tmp
    emptyDir: {}
  {{- if .data }}
  {{- if .root.Values.storage.claimName }}
  - name: data
    persistentVolumeClaim:
      claimName: {{ .root.Values.storage.claimName }}
  {{- end }}
  {{- end }}
  {{- if .root.Values.tls.secretName }}
  - name: tls
    secret:
      secretName: {{ .root.Values.tls.secretName }}
  {{- end }}
{{- end }}

{{/* Liveness and readiness of a worker, the receiver and the HL7 listener (metrics port). */}}
{{- define "pacsfetch.probes" -}}
livenessProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: 20
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: metrics}
  periodSeconds: 10
  failureThreshold: 2
{{- end }}
