{{/*
Shared helpers: names, labels, the pod template of every Ray pod, and the checks that make
a bad combination of values fail at `helm install` time instead of on the cluster.
*/}}

{{- define "trip.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "trip.fullname" -}}
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

{{/* "<fullname>-<suffix>" within 63 characters; call with (list $ "suffix"). */}}
{{- define "trip.objectName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "trip.fullname" $root | trunc (int (sub 62 (len (index . 1))))  | trimSuffix "-") (index . 1) }}
{{- end }}

{{/*
Name of a RayJob: KubeRay appends a random suffix for the RayCluster and "-head-svc" for
its Service, and refuses RayJob names longer than 47 characters.
*/}}
{{- define "trip.rayJobName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "trip.fullname" $root | trunc (int (sub 46 (len (index . 1)))) | trimSuffix "-") (index . 1) }}
{{- end }}

{{- define "trip.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that identify this release's pods (NetworkPolicy and PodMonitor selectors). */}}
{{- define "trip.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trip.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "trip.labels" -}}
helm.sh/chart: {{ include "trip.chart" . }}
{{ include "trip.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: trip
{{- end }}

{{- define "trip.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "trip.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "trip.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "trip.configMapName" -}}
{{- include "trip.objectName" (list . "config") }}
{{- end }}

{{/* Labels of the RayJob object itself: the batch-scheduler queue, when one is used. */}}
{{- define "trip.queueLabels" -}}
{{- if eq .Values.queue.kind "kueue" }}
kueue.x-k8s.io/queue-name: {{ .Values.queue.name | quote }}
{{- else if eq .Values.queue.kind "volcano" }}
ray.io/scheduler-name: volcano
volcano.sh/queue-name: {{ .Values.queue.name | quote }}
{{- end }}
{{- end }}

{{/*
Environment of every Ray container. Object-storage credentials come only from the
existing Secret named in objectStorage.existingSecret (never from values).
*/}}
{{- define "trip.env" -}}
- name: HOME
  value: /home/trip
- name: TRIP_CONFIG
  value: /etc/trip/config.yaml
- name: TORCH_EXTENSIONS_DIR
  value: /home/trip/.cache/torch_extensions
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- with .Values.objectStorage.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.objectStorage.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.objectStorage.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $.Values.objectStorage.accessKeyIdKey | quote }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $.Values.objectStorage.secretAccessKeyKey | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Seconds a training worker has to checkpoint after SIGTERM: runConfig.run.preemption_grace_s
(the trainer's default, 25, when unset), rounded up.
*/}}
{{- define "trip.preemptionGrace" -}}
{{- $run := .Values.runConfig.run | default dict -}}
{{- $g := $run.preemption_grace_s | default 25 -}}
{{- int (ceil (float64 $g)) -}}
{{- end }}

{{/*
Pod template of a Ray head or worker pod.
Arguments (dict): root, group (head/workers values), component (train|preprocess),
node (head|worker), ports (list of container ports), gpus (int), gpuResourceName,
exporter (bool: pod runs trainer exporters), automount (bool: the autoscaler sidecar needs
the API token).
*/}}
{{- define "trip.rayPodTemplate" -}}
{{- $root := .root }}
{{- $group := .group -}}
metadata:
  labels:
    {{- include "trip.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    trip.io/node-type: {{ .node }}
    {{- if .exporter }}
    trip.io/metrics: "true"
    {{- end }}
spec:
  {{- if and (eq .component "train") (eq .node "worker") }}
  {{- /* room for the preStop hook (the workers' preemption checkpoint) plus `ray stop` */}}
  terminationGracePeriodSeconds: {{ add (include "trip.preemptionGrace" $root | int) 15 }}
  {{- end }}
  serviceAccountName: {{ include "trip.serviceAccountName" $root }}
  automountServiceAccountToken: {{ .automount | default false }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.queue.priorityClassName }}
  priorityClassName: {{ . | quote }}
  {{- end }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-{{ .node }}
      image: {{ include "trip.image" $root | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- if eq .node "head" }}
      lifecycle:
        preStop:
          exec:
            command: ["/bin/sh", "-c", "ray stop"]
      {{- else if eq .component "train" }}
      lifecycle:
        # Drain / spot reclaim: SIGTERM the training workers first, while Ray is still up, so
        # the group checkpoints at the next step (run.preemption_grace_s); then let Kubernetes
        # stop the container.
        preStop:
          exec:
            command: ["/bin/sh", "-c", "pkill -TERM -f 'ray::RayTrainWorker' || exit 0; for i in $(seq {{ include "trip.preemptionGrace" $root }}); do pgrep -f 'ray::RayTrainWorker' >/dev/null || exit 0; sleep 1; done"]
      {{- end }}
      ports:
        {{- toYaml .ports | nindent 8 }}
      env:
        {{- include "trip.env" $root | nindent 8 }}
      resources:
        requests:
          {{- toYaml $group.resources.requests | nindent 10 }}
          {{- if gt (int .gpus) 0 }}
          {{ .gpuResourceName }}: {{ .gpus }}
          {{- end }}
        limits:
          {{- toYaml $group.resources.limits | nindent 10 }}
          {{- if gt (int .gpus) 0 }}
          {{ .gpuResourceName }}: {{ .gpus }}
          {{- end }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: run-config
          mountPath: /etc/trip
          readOnly: true
        - name: tmp
          mountPath: /tmp
        - name: home
          mountPath: /home/trip
        - name: dshm
          mountPath: /dev/shm
        {{- with $root.Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: run-config
      configMap:
        name: {{ include "trip.configMapName" $root }}
    - name: tmp
      emptyDir: {}
    - name: home
      emptyDir: {}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $group.shmSize }}
    {{- with $root.Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* Container ports of a Ray head pod; 8080 is Ray's metrics port (--metrics-export-port). */}}
{{- define "trip.headPorts" -}}
- name: gcs-server
  containerPort: 6379
  protocol: TCP
- name: dashboard
  containerPort: 8265
  protocol: TCP
- name: client
  containerPort: 10001
  protocol: TCP
- name: metrics
  containerPort: 8080
  protocol: TCP
{{- end }}

{{/*
Trainer exporter ports of one worker pod: runConfig.metrics.port + local_rank for each of
the workersPerPod Ray Train workers (trip.io/metrics pods, scraped by the trainer PodMonitor).
*/}}
{{- define "trip.trainerPorts" -}}
{{- $base := int .Values.runConfig.metrics.port }}
{{- if gt $base 0 }}
{{- range $i := until (int .Values.train.workers.workersPerPod) }}
- name: trip-metrics-{{ $i }}
  containerPort: {{ add $base $i }}
  protocol: TCP
{{- end }}
{{- end }}
{{- end }}

{{/* The submitter pod (KubeRay runs `ray job submit` in it): same image, locked down. */}}
{{- define "trip.submitterPodTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "trip.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    trip.io/node-type: submitter
spec:
  restartPolicy: Never
  serviceAccountName: {{ include "trip.serviceAccountName" $root }}
  automountServiceAccountToken: false
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-job-submitter
      image: {{ include "trip.image" $root | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      env:
        - name: HOME
          value: /home/trip
      resources:
        requests: {cpu: 200m, memory: 256Mi}
        limits: {cpu: "1", memory: 1Gi}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: home
          mountPath: /home/trip
  volumes:
    - name: tmp
      emptyDir: {}
    - name: home
      emptyDir: {}
{{- end }}

{{/*
Checks the schema cannot express (relations between values); each message names the keys.
*/}}
{{- define "trip.validate" -}}
{{- $v := .Values }}
{{- $s := $v.runConfig.scaling | default dict }}
{{- if not (or $v.train.enabled $v.preprocess.enabled) }}
{{- fail "nothing to deploy: set train.enabled and/or preprocess.enabled to true" }}
{{- end }}
{{- range $job := list "train" "preprocess" }}
{{- $w := (get $v $job).workers }}
{{- if gt (int $w.minReplicas) (int $w.maxReplicas) }}
{{- fail (printf "%s.workers.minReplicas (%v) must be <= %s.workers.maxReplicas (%v)" $job $w.minReplicas $job $w.maxReplicas) }}
{{- end }}
{{- if or (lt (int $w.replicas) (int $w.minReplicas)) (gt (int $w.replicas) (int $w.maxReplicas)) }}
{{- fail (printf "%s.workers.replicas (%v) must lie within %s.workers.minReplicas..maxReplicas (%v..%v)" $job $w.replicas $job $w.minReplicas $w.maxReplicas) }}
{{- end }}
{{- end }}
{{- if $v.train.enabled }}
{{- $w := $v.train.workers }}
{{- $k := int $w.workersPerPod }}
{{- $num := int (default 2 $s.num_workers) }}
{{- if and (hasKey $s "min_workers") (not (kindIs "invalid" $s.min_workers)) }}
{{- if ne (mul (int $w.minReplicas) $k) (int $s.min_workers) }}
{{- fail (printf "train.workers.minReplicas x workersPerPod = %d x %d must equal runConfig.scaling.min_workers (%v)" (int $w.minReplicas) $k $s.min_workers) }}
{{- end }}
{{- if ne (mul (int $w.maxReplicas) $k) (int $s.max_workers) }}
{{- fail (printf "train.workers.maxReplicas x workersPerPod = %d x %d must equal runConfig.scaling.max_workers (%v)" (int $w.maxReplicas) $k $s.max_workers) }}
{{- end }}
{{- else }}
{{- if or (ne (mul (int $w.replicas) $k) $num) (ne (int $w.minReplicas) (int $w.replicas)) (ne (int $w.maxReplicas) (int $w.replicas)) }}
{{- fail (printf "fixed-size run: train.workers.replicas, minReplicas and maxReplicas (%v, %v, %v) x workersPerPod (%d) must all equal runConfig.scaling.num_workers (%d); for an elastic run set runConfig.scaling.min_workers/max_workers" $w.replicas $w.minReplicas $w.maxReplicas $k $num) }}
{{- end }}
{{- end }}
{{- $cpuLimit := toString (index ($w.resources.limits | default dict) "cpu" | default "0") }}
{{- $cpus := ternary (divf (float64 (trimSuffix "m" $cpuLimit)) 1000.0) (float64 $cpuLimit) (hasSuffix "m" $cpuLimit) }}
{{- $needCpus := mulf (float64 $k) (float64 (default 1 $s.cpus_per_worker)) }}
{{- if lt $cpus $needCpus }}
{{- fail (printf "train.workers.resources.limits.cpu (%s) is below workersPerPod x runConfig.scaling.cpus_per_worker (%v): Ray could never place the training workers" $cpuLimit $needCpus) }}
{{- end }}
{{- if $s.use_gpu }}
{{- $want := mulf (float64 $k) (float64 (default 1 $s.gpus_per_worker)) }}
{{- if ne (float64 $w.gpus) $want }}
{{- fail (printf "train.workers.gpus (%v) must equal workersPerPod x runConfig.scaling.gpus_per_worker (%v)" $w.gpus $want) }}
{{- end }}
{{- else if gt (int $w.gpus) 0 }}
{{- fail (printf "train.workers.gpus is %v but runConfig.scaling.use_gpu is false: set use_gpu: true or gpus: 0" $w.gpus) }}
{{- end }}
{{- $port := int ($v.runConfig.metrics | default dict).port }}
{{- if gt $port 0 }}
{{- range $p := list 6379 8080 8265 10001 }}
{{- if and (ge $p $port) (lt $p (add $port $k)) }}
{{- fail (printf "runConfig.metrics.port %d..%d (port + local_rank) collides with Ray's port %d" $port (sub (add $port $k) 1) $p) }}
{{- end }}
{{- end }}
{{- if gt (add $port $k) 65536 }}
{{- fail (printf "runConfig.metrics.port %d + workersPerPod %d exceeds 65535" $port $k) }}
{{- end }}
{{- end }}
{{- end }}
{{- $driverPort := int ($v.runConfig.preprocess | default dict).metrics_port }}
{{- if and $v.preprocess.enabled (has $driverPort (list 6379 8080 8265 10001)) }}
{{- fail (printf "runConfig.preprocess.metrics_port %d collides with a Ray port on the head pod" $driverPort) }}
{{- end }}
{{- $storage := ($v.runConfig.run | default dict).storage_path | default "./runs" }}
{{- if and $v.train.enabled (not (contains "://" $storage)) (not $v.extraVolumeMounts) }}
{{- fail (printf "runConfig.run.storage_path %q is a local path: every Ray pod must reach the checkpoints, so use object storage (s3://...) or mount a shared volume with extraVolumes/extraVolumeMounts" $storage) }}
{{- end }}
{{- if and (eq $v.queue.kind "kueue") $v.train.autoscaler.enabled }}
{{- fail "queue.kind=kueue cannot be combined with train.autoscaler.enabled: Kueue admits RayJobs of a fixed size" }}
{{- end }}
{{- if and (ne $v.queue.kind "none") (not $v.queue.name) }}
{{- fail (printf "queue.name is required when queue.kind is %s" $v.queue.kind) }}
{{- end }}
{{- end }}
