{{/* Names, labels and the pieces every pod of the chart shares. */}}

{{- define "protege.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* RayService appends suffixes to this name (e.g. -serve-svc, -head-svc): keep it short. */}}
{{- define "protege.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else if contains (include "protege.name" .) .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "protege.name" .) | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "protege.selectorLabels" -}}
app.kubernetes.io/name: {{ include "protege.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "protege.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "protege.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Where the settings document is mounted in every pod. */}}
{{- define "protege.configDir" -}}/etc/protege{{- end }}
{{- define "protege.configPath" -}}{{ include "protege.configDir" . }}/config.yaml{{- end }}

{{- define "protege.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- printf "%s:%s" (required "image.repository: missing (an image with protege installed, e.g. registry.example.com/protege)" .Values.image.repository) $tag -}}
{{- end }}

{{/* The effective settings document as JSON: configFile (a whole file, verbatim) when set,
else the protege: block. */}}
{{- define "protege.settingsJson" -}}
{{- if .Values.configFile -}}
{{- $doc := .Values.configFile | fromYaml -}}
{{- if hasKey $doc "Error" }}{{ fail (printf "configFile: not valid YAML (%s)" $doc.Error) }}{{ end -}}
{{- toJson $doc -}}
{{- else -}}
{{- toJson (.Values.protege | default dict) -}}
{{- end -}}
{{- end }}

{{/* The name of the Secret with the pods' secret env vars ("" when there is none). */}}
{{- define "protege.secretName" -}}
{{- if .Values.secrets.existingSecret -}}
{{- .Values.secrets.existingSecret -}}
{{- else if eq (include "protege.secretData" . | trim) "{}" -}}
{{- else -}}
{{- printf "%s-env" (include "protege.fullname" .) -}}
{{- end -}}
{{- end }}

{{/* The chart's own Secret data (env var name -> value), as JSON. */}}
{{- define "protege.secretData" -}}
{{- $data := dict -}}
{{- with .Values.secrets.apiKeys }}{{ $_ := set $data "PROTEGE_API_KEYS" (join "," .) }}{{ end -}}
{{- $shadow := (include "protege.settingsJson" . | fromJson).shadow | default dict -}}
{{- with .Values.postgres.dsn }}{{ $_ := set $data ($shadow.postgres_dsn_env | default "PROTEGE_POSTGRES_DSN") . }}{{ end -}}
{{- with .Values.objectStore.accessKeyId }}{{ $_ := set $data "AWS_ACCESS_KEY_ID" . }}{{ end -}}
{{- with .Values.objectStore.secretAccessKey }}{{ $_ := set $data "AWS_SECRET_ACCESS_KEY" . }}{{ end -}}
{{- range $k, $v := .Values.secrets.env }}{{ $_ := set $data $k (toString $v) }}{{ end -}}
{{- toJson $data -}}
{{- end }}

{{/* Env var names the settings need from a Secret; fails when one has no source. */}}
{{- define "protege.checkSecrets" -}}
{{- $p := include "protege.settingsJson" . | fromJson -}}
{{- $data := include "protege.secretData" . | fromJson -}}
{{- $existing := .Values.secrets.existingSecret -}}
{{- $needed := list -}}
{{- range $name, $v := $p.variants | default dict }}
{{- if and (kindIs "map" $v.engine) (eq (toString $v.engine.engine) "remote") $v.engine.api_key_env }}
{{- $needed = append $needed (list (printf "protege.variants.%s.engine.api_key_env" $name) $v.engine.api_key_env) }}
{{- end }}
{{- end }}
{{- range $name, $r := $p.routes | default dict }}
{{- if and (kindIs "map" $r.shadow) (kindIs "map" ($r.shadow).remote) }}
{{- with $r.shadow.remote.api_key_env }}
{{- $needed = append $needed (list (printf "protege.routes.%s.shadow.remote.api_key_env" $name) .) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not $existing }}
{{- range $needed }}
{{- if not (hasKey $data (index . 1)) }}
{{- fail (printf "%s names %s, which has no value: set secrets.env.%s or secrets.existingSecret" (index . 0) (index . 1) (index . 1)) }}
{{- end }}
{{- end }}
{{- $shadow := $p.shadow | default dict }}
{{- if and (eq (toString $shadow.store) "postgres") (not .Values.postgres.dsn) }}
{{- fail "protege.shadow.store is postgres but postgres.dsn is empty: set postgres.dsn (postgresql://user:pass@host:5432/db) or secrets.existingSecret" }}
{{- end }}
{{- $registry := $p.registry | default dict }}
{{- if and (hasPrefix "s3://" (toString $registry.root)) (not .Values.objectStore.ambientCredentials) (not (and .Values.objectStore.accessKeyId .Values.objectStore.secretAccessKey)) }}
{{- fail (printf "protege.registry.root is %s but objectStore.accessKeyId/secretAccessKey are empty: set them, or secrets.existingSecret, or objectStore.ambientCredentials: true (node or service-account credentials)" $registry.root) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Checks that the settings document and the Ray cluster fit together. */}}
{{- define "protege.checkValues" -}}
{{- $p := include "protege.settingsJson" . | fromJson -}}
{{- if not $p.variants }}{{ fail "protege.variants: missing (at least one model variant)" }}{{ end }}
{{- if not $p.routes }}{{ fail "protege.routes: missing (at least one route)" }}{{ end }}
{{- range $name, $v := $p.variants }}
{{- if and (gt (float64 ($v.num_gpus | default 0)) 0.0) (not $.Values.gpuWorkers.enabled) }}
{{- fail (printf "protege.variants.%s.num_gpus is %v but gpuWorkers.enabled is false: enable the GPU worker group or set num_gpus: 0" $name $v.num_gpus) }}
{{- end }}
{{- end }}
{{- range $name, $r := $p.routes }}
{{- if and (kindIs "map" $r) (kindIs "map" $r.shadow) $r.shadow.variant $r.shadow.remote }}
{{- fail (printf "protege.routes.%s.shadow sets both variant and remote (a values file's protege: merges into the chart's defaults: set variant: null, or pass the whole file with --set-file configFile=FILE)" $name) }}
{{- end }}
{{- end }}
{{- if and .Values.loopCronJob.enabled (not ($p.loop | default dict).recipe) }}
{{- fail "loopCronJob.enabled but protege.loop.recipe is not set: the loop needs a KD recipe (e.g. configFiles.recipe.yaml and protege.loop.recipe: /etc/protege/recipe.yaml)" }}
{{- end }}
{{- if not (or .Values.secrets.apiKeys .Values.secrets.existingSecret .Values.insecureNoAuth) }}
{{- fail "secrets.apiKeys: empty, and no secrets.existingSecret: the gateway would serve the models, the stored prompts (/review) and label writes to anyone who reaches it. Set API keys, or insecureNoAuth: true to serve without them on purpose" }}
{{- end }}
{{- include "protege.checkSecrets" . }}
{{- end }}

{{/* The Serve config (serveConfigV2): one application built by ops.rayservice:app_builder. */}}
{{- define "protege.serveConfig" -}}
{{- $p := include "protege.settingsJson" . | fromJson -}}
{{- $server := $p.server | default dict -}}
{{- $ing := $server.ingress | default dict -}}
{{- $deployments := list -}}
{{- $ingCpus := 0.5 }}{{ if hasKey $ing "num_cpus" }}{{ $ingCpus = $ing.num_cpus }}{{ end -}}
{{- $deployments = append $deployments (dict "name" "ingress" "num_replicas" ($ing.replicas | default 1) "ray_actor_options" (dict "num_cpus" $ingCpus)) -}}
{{- range $name, $v := $p.variants -}}
{{- $cpus := 1.0 }}{{ if hasKey $v "num_cpus" }}{{ $cpus = $v.num_cpus }}{{ end -}}
{{- $deployments = append $deployments (dict "name" (printf "variant-%s" $name) "num_replicas" ($v.replicas | default 1) "ray_actor_options" (dict "num_cpus" $cpus "num_gpus" ($v.num_gpus | default 0))) -}}
{{- end -}}
{{- $shadowed := false -}}
{{- range $p.routes }}{{ if .shadow }}{{ $shadowed = true }}{{ end }}{{ end -}}
{{- if or $shadowed $p.feedback -}}
{{- $sh := $p.shadow | default dict -}}
{{- $deployments = append $deployments (dict "name" "shadow" "num_replicas" 1 "ray_actor_options" (dict "num_cpus" ($sh.num_cpus | default 0))) -}}
{{- end -}}
{{- $args := dict "config" (include "protege.configPath" .) -}}
{{- $app := dict "name" "protege" "route_prefix" "/" "import_path" "ops.rayservice:app_builder" "args" $args "deployments" $deployments -}}
{{- with .Values.serve.runtimeEnv }}{{ $_ := set $app "runtime_env" . }}{{ end -}}
{{- $cfg := dict "proxy_location" .Values.serve.proxyLocation "http_options" (dict "host" "0.0.0.0" "port" ($server.port | default 8000)) "applications" (list $app) -}}
{{- toYaml $cfg -}}
{{- end }}

{{/* Volumes and mounts shared by the Ray pods and the loop's CronJob. */}}
{{- define "protege.volumes" -}}
- name: config
  configMap:
    name: {{ include "protege.fullname" . }}-config
{{- if .Values.persistence.enabled }}
- name: data
  persistentVolumeClaim:
    claimName: {{ .Values.persistence.existingClaim | default (printf "%s-data" (include "protege.fullname" .)) }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "protege.volumeMounts" -}}
- name: config
  mountPath: {{ include "protege.configDir" . }}
  readOnly: true
{{- if .Values.persistence.enabled }}
- name: data
  mountPath: {{ .Values.persistence.mountPath }}
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* env and envFrom of every protege container. */}}
{{- define "protege.env" -}}
{{- $env := list -}}
{{- with .Values.objectStore.endpointUrl }}{{ $env = append $env (dict "name" "AWS_ENDPOINT_URL" "value" .) }}{{ end -}}
{{- with .Values.objectStore.region }}{{ $env = append $env (dict "name" "AWS_DEFAULT_REGION" "value" .) }}{{ end -}}
{{- range $k, $v := .Values.env }}{{ $env = append $env (dict "name" $k "value" (toString $v)) }}{{ end -}}
{{- $env = concat $env (.Values.extraEnv | default list) -}}
{{- with $env }}
env:
{{ toYaml . | indent 2 }}
{{- end }}
{{- $from := list -}}
{{- with include "protege.secretName" . }}{{ $from = append $from (dict "secretRef" (dict "name" .)) }}{{ end -}}
{{- $from = concat $from (.Values.extraEnvFrom | default list) -}}
{{- with $from }}
envFrom:
{{ toYaml . | indent 2 }}
{{- end }}
{{- end }}

{{/* Pod-level fields shared by the Ray pods and the CronJob. */}}
{{- define "protege.podSpecCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{ toYaml . }}
{{- end }}
{{- if .Values.serviceAccount.name }}
serviceAccountName: {{ .Values.serviceAccount.name }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
{{ toYaml . | indent 2 }}
{{- end }}
{{- end }}

{{- define "protege.podAnnotations" -}}
{{- if .Values.restartOnConfigChange }}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include "protege.secretData" . | sha256sum }}
{{- end }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}
