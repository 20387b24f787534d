//! A labelled synthetic corpus of Chinese and English clinical sentences, and
//! the precision/recall evaluation of a [`Deidentifier`] against it.
//!
//! Every identifier the generator embeds is labelled with its category and
//! byte span: resident IDs (18-character, 15-digit legacy, and ID-shaped with
//! a wrong check character, which are still IDs), mobiles and landlines in
//! several spellings, e-mail, bank cards (Luhn, 16–19 digits, grouped or not),
//! medical-record / inpatient / insurance numbers after their keywords, names
//! (from the dictionary, and some outside it marked only by a label or title),
//! Chinese and English addresses, and dates in three formats (dates of birth in
//! narrative included). Hard negatives are left unlabelled: lab values and
//! dosages, blood pressures, compact `YYYYMMDD` dates, 18-digit order numbers
//! with a wrong check character and no ID shape, 12-digit specimen barcodes and
//! 10-digit "inpatient-looking" numbers without a keyword, lot numbers.
//!
//! The corpus is a function of its seed (SplitMix64, no dependency), so the
//! figures it yields are reproducible. It measures the detectors on the forms
//! it generates; real records hold forms it does not, which is why recall on
//! it must be near 1, not merely good.

use std::collections::BTreeMap;
use std::fmt;

use crate::{Category, DeidConfig, Deidentifier, checks};

/// One labelled identifier: category and byte span in [`LabelledRecord::text`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub category: Category,
    pub start: usize,
    pub end: usize,
}

/// A synthetic record: its key (for the date shift), text and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelledRecord {
    pub key: String,
    pub text: String,
    pub labels: Vec<Label>,
    /// How many hard negatives (unlabelled look-alikes) the text holds.
    pub hard_negatives: usize,
}

/// SplitMix64: a small, stable generator for the corpus.
struct Rng(crate::SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn range(&mut self, low: u64, high_inclusive: u64) -> u64 {
        low + self.next() % (high_inclusive - low + 1)
    }
    fn digits(&mut self, count: usize) -> String {
        (0..count)
            .map(|_| char::from(b'0' + self.below(10) as u8))
            .collect()
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const SURNAMES: &[&str] = &[
    "张", "王", "李", "刘", "陈", "杨", "赵", "黄", "周", "吴", "徐", "孙", "朱", "胡", "郭", "林",
    "何", "欧阳",
];
const GIVEN_NAMES: &[&str] = &[
    "伟", "芳", "娜", "敏", "静", "磊", "洋", "婷", "杰", "强", "军", "丽", "霞", "勇", "艳", "涛",
    "秀英", "桂兰", "建华", "志强", "海燕", "晓峰",
];
/// Chinese names not in the dictionary: found only through a name pattern.
const UNLISTED_CHINESE_NAMES: &[&str] =
    &["宋晓东", "韩雨桐", "唐一鸣", "冯子涵", "曹思远", "彭可欣"];
const ENGLISH_FIRST: &[&str] = &[
    "John", "Mary", "Robert", "Linda", "Michael", "Susan", "David", "Karen", "James", "Emily",
];
const ENGLISH_LAST: &[&str] = &[
    "Smith", "Johnson", "Brown", "Davis", "Miller", "Wilson", "Moore", "Taylor", "Anderson",
    "Thomas",
];
/// English surnames not in the dictionary: found only after a title.
const UNLISTED_ENGLISH_LAST: &[&str] = &["Hargreaves", "Okafor", "Lindqvist", "Castellano"];

const PROVINCES: &[&str] = &[
    "广东", "浙江", "江苏", "四川", "湖北", "湖南", "山东", "河南",
];
const MUNICIPALITIES: &[&str] = &["北京", "上海", "天津", "重庆"];
const CITIES: &[&str] = &[
    "广州", "深圳", "杭州", "宁波", "南京", "苏州", "成都", "武汉", "长沙", "济南", "青岛", "郑州",
];
const DISTRICTS: &[&str] = &[
    "天河", "西湖", "鼓楼", "武侯", "江汉", "岳麓", "历下", "市南", "金水", "朝阳",
];
const ROADS: &[&str] = &[
    "中山", "人民", "解放", "文三", "建设", "长江", "延安", "光明",
];
const STREETS_EN: &[&str] = &["Baker", "Maple", "Oak", "Elm", "Cedar Hill", "Park"];
const STREET_KINDS_EN: &[&str] = &["Street", "Road", "Avenue", "Lane", "Drive"];
const ID_AREAS: &[&str] = &[
    "110105", "310115", "440106", "330106", "510107", "420102", "370102",
];
const EMAIL_USERS: &[&str] = &[
    "zhangwei",
    "li.na",
    "wang_fang",
    "j.smith",
    "mary.j",
    "chen88",
    "dr.zhou",
];
const EMAIL_DOMAINS: &[&str] = &[
    "163.com",
    "qq.com",
    "hospital.org.cn",
    "example.com",
    "mail.sysu.edu.cn",
];

/// The name dictionary the corpus assumes (every listed Chinese and English name).
pub fn dictionary_names() -> Vec<String> {
    let mut names = Vec::new();
    for surname in SURNAMES {
        for given in GIVEN_NAMES {
            names.push(format!("{surname}{given}"));
        }
    }
    for first in ENGLISH_FIRST {
        for last in ENGLISH_LAST {
            names.push(format!("{first} {last}"));
        }
    }
    names
}

/// The configuration the corpus is meant to be de-identified with:
/// [`DeidConfig::clinical`] with the corpus's dictionary.
pub fn corpus_config(seed: u64) -> DeidConfig {
    DeidConfig::clinical(seed, dictionary_names())
}

// Placeholders: `{KIND}` in a template. Positive kinds are labelled; the
// `NEG_*` kinds are hard negatives and never labelled.
const CHINESE_TEMPLATES: &[&str] = &[
    "患者{NAME}，男，身份证号{ID}，于{DATE}因胸痛入院。",
    "患者{NAME}，女，身份证{ID15}，{DATE}门诊就诊，血红蛋白{NEG_LAB} g/L。",
    "姓名：{NAME_UNLISTED}，病案号：{MRN}，住院号{INPATIENT}。",
    "联系电话{MOBILE}，家属电话{LANDLINE}，家住{ADDRESS}。",
    "住址：{ADDRESS}，医保卡号：{INSURANCE}。",
    "出生日期{DATE}，身份证号{ID_TYPO}（核对有误）。",
    "退费至银行卡{CARD}，持卡人{NAME}。",
    "患者邮箱{EMAIL}，手机{MOBILE}。",
    "血压{NEG_BP} mmHg，心率{NEG_SMALL}次/分，阿莫西林{NEG_DOSE} mg 每日三次。",
    "检验条码{NEG_SPECIMEN}，标本号{NEG_INPATIENT_LIKE}，批号{NEG_LOT}。",
    "订单号{NEG_ORDER18}，流水号{NEG_COMPACT_DATE}{NEG_SMALL}。",
    "患者{NEG_COMPACT_DATE}出生，{DATE}复查，肌酐{NEG_LAB} μmol/L，空腹血糖{NEG_DECIMAL} mmol/L。",
    "于{DATE}行腹腔镜胆囊切除术，术后第{NEG_SMALL}天出院，{DATE}拆线。",
    "联系人：{NAME_UNLISTED}，电话{LANDLINE}，现居{ADDRESS}。",
    "主治医师{NAME}查房，指示复查血常规，白细胞{NEG_DECIMAL}×10^9/L。",
    "输液泵编号{NEG_DEVICE11}，设备序列号{NEG_SERIAL16}，静脉滴注{NEG_LAB} mL，{NEG_SMALL}:30完成。",
    "电话：{MOBILE}（本人），{LANDLINE}（单位）；身份证号码：{ID}。",
];
const ENGLISH_TEMPLATES: &[&str] = &[
    "Patient {NAME_EN} (MRN: {MRN}) presented with chest pain on {DATE}.",
    "Mr. {NAME_EN_UNLISTED} was admitted on {DATE}; inpatient no. {INPATIENT}.",
    "Contact: mobile {MOBILE}, home {LANDLINE}, e-mail {EMAIL}.",
    "The patient lives at {ADDRESS_EN} with her daughter.",
    "Insurance ID {INSURANCE}; card {CARD} on file.",
    "Born on {DATE}, resident ID {ID}, seen by Dr. {NAME_EN_UNLISTED} today.",
    "BP {NEG_BP} mmHg, HbA1c {NEG_DECIMAL}%, metformin {NEG_DOSE} mg twice daily.",
    "Specimen barcode {NEG_SPECIMEN}, order {NEG_ORDER18}, lot {NEG_LOT}.",
    "Name: {NAME_EN}, follow-up on {DATE} at the cardiology clinic.",
    "Reference number {NEG_INPATIENT_LIKE} was scanned at {NEG_SMALL}:30.",
    "Pump serial {NEG_SERIAL16}, device {NEG_DEVICE11}, Room {NEG_LAB}, ICD-10 I10, eGFR {NEG_LAB} mL/min.",
];

/// Harder forms than the main corpus: names outside the dictionary with no
/// label or title, dotted and spaced phone numbers, dashed IDs, obfuscated
/// e-mail (`name at 163 dot com`), addresses without a house number, dates
/// written with dots or in English. The detectors handle all but two of them:
/// unmarked names (that needs a trained recogniser, not patterns) and
/// obfuscated e-mail. [`stress_corpus`] keeps them in so that the figures
/// show where recall ends.
const STRESS_TEMPLATES: &[&str] = &[
    "患者{NAME_UNMARKED}因发热{NEG_SMALL}天入院。",
    "{NAME_EN_UNMARKED} was seen in clinic.",
    "手机 {MOBILE_DOTTED}，座机 {LANDLINE_SPACED}。",
    "身份证 {ID_DASHED}。",
    "邮箱 {EMAIL_OBFUSCATED}。",
    "家住{ADDRESS_PARTIAL}。",
    "复诊日期 {DATE_DOTTED}，follow-up on {DATE_ENGLISH}.",
    "银行卡 {CARD}，手机{MOBILE}。",
];

struct Builder<'r> {
    rng: &'r mut Rng,
    text: String,
    labels: Vec<Label>,
    hard_negatives: usize,
}

impl Builder<'_> {
    fn push_label(&mut self, category: Category, value: &str) {
        let start = self.text.len();
        self.text.push_str(value);
        self.labels.push(Label {
            category,
            start,
            end: self.text.len(),
        });
    }

    fn resident_id(&mut self, wrong_check: bool) -> String {
        let area = *self.rng.pick(ID_AREAS);
        let birth = checks::CivilDate::from_days(self.rng.range(0, 30_600) as i64 - 14_600);
        let first_17 = format!(
            "{area}{:04}{:02}{:02}{}",
            birth.year,
            birth.month,
            birth.day,
            self.rng.digits(3)
        );
        let check = checks::resident_id_check_character(&first_17).expect("17 digits");
        let check = if wrong_check {
            let candidates: Vec<char> = "0123456789X".chars().filter(|c| *c != check).collect();
            *self.rng.pick(&candidates)
        } else {
            check
        };
        let id = format!("{first_17}{check}");
        if check == 'X' && self.rng.chance(30) {
            return format!("{first_17}x");
        }
        if !wrong_check && self.rng.chance(10) {
            format!("{} {} {}", &id[..6], &id[6..14], &id[14..])
        } else {
            id
        }
    }

    fn legacy_id(&mut self) -> String {
        let area = *self.rng.pick(ID_AREAS);
        let birth = checks::CivilDate::from_days(self.rng.range(0, 25_500) as i64 - 14_600);
        format!(
            "{area}{:02}{:02}{:02}{}",
            birth.year % 100,
            birth.month,
            birth.day,
            self.rng.digits(3)
        )
    }

    fn mobile(&mut self) -> String {
        let number = format!("1{}{}", self.rng.range(3, 9), self.rng.digits(9));
        match self.rng.below(6) {
            0 => format!("+86 {} {} {}", &number[..3], &number[3..7], &number[7..]),
            4 => format!("{} {} {}", &number[..3], &number[3..7], &number[7..]),
            1 => format!("+86{number}"),
            2 => format!("{}-{}-{}", &number[..3], &number[3..7], &number[7..]),
            _ => number,
        }
    }

    fn landline(&mut self) -> String {
        let subscriber =
            |rng: &mut Rng, length: usize| format!("{}{}", rng.range(2, 8), rng.digits(length - 1));
        match self.rng.below(6) {
            0 => format!("010-{}", subscriber(self.rng, 8)),
            4 => format!(
                "010-{}-{}",
                subscriber(self.rng, 8),
                self.rng.range(100, 9999)
            ),
            5 => {
                let number = subscriber(self.rng, 8);
                format!("0571-{} {}", &number[..4], &number[4..])
            }
            1 => format!("0{}-{}", self.rng.range(310, 999), subscriber(self.rng, 7)),
            2 => format!("021{}", subscriber(self.rng, 8)),
            _ => format!("(0755) {}", subscriber(self.rng, 8)),
        }
    }

    fn bank_card(&mut self) -> String {
        let length = self.rng.range(16, 19) as usize;
        let prefix = *self.rng.pick(&["622202", "621700", "436742", "518710"]);
        let body = format!("{prefix}{}", self.rng.digits(length - 7));
        let card = format!(
            "{body}{}",
            checks::luhn_check_digit(&body).expect("a digit fits")
        );
        if self.rng.chance(40) {
            let groups: Vec<&str> = card
                .as_bytes()
                .chunks(4)
                .map(|chunk| std::str::from_utf8(chunk).expect("ASCII"))
                .collect();
            groups.join(if self.rng.chance(25) { "-" } else { " " })
        } else {
            card
        }
    }

    fn date(&mut self) -> String {
        let date = checks::CivilDate::from_days(self.rng.range(0, 30_500) as i64 - 10_000);
        match self.rng.below(4) {
            0 => format!("{:04}-{:02}-{:02}", date.year, date.month, date.day),
            3 => format!("{}-{}-{}", date.year, date.month, date.day),
            1 => format!("{}/{}/{}", date.year, date.month, date.day),
            _ => format!("{}年{}月{}日", date.year, date.month, date.day),
        }
    }

    fn address_chinese(&mut self) -> String {
        let street = format!("{}路{}号", self.rng.pick(ROADS), self.rng.range(1, 999));
        let unit = if self.rng.chance(40) {
            format!("{}栋{}室", self.rng.range(1, 30), self.rng.range(101, 2505))
        } else {
            String::new()
        };
        let district = self.rng.pick(DISTRICTS);
        match self.rng.below(3) {
            0 => format!(
                "{}省{}市{district}区{street}{unit}",
                self.rng.pick(PROVINCES),
                self.rng.pick(CITIES)
            ),
            1 => format!(
                "{}市{district}区{street}{unit}",
                self.rng.pick(MUNICIPALITIES)
            ),
            _ => format!("{}市{district}区{street}{unit}", self.rng.pick(CITIES)),
        }
    }

    /// An 18-digit number with no ID shape (its "province" is unknown), a
    /// wrong check character, and failing Luhn: an order number, not an identifier.
    fn order_number(&mut self) -> String {
        loop {
            let first_17 = format!("20{}", self.rng.digits(15));
            let check = checks::resident_id_check_character(&first_17).expect("17 digits");
            let last = char::from(b'0' + self.rng.below(10) as u8);
            let number = format!("{first_17}{last}");
            if last != check && !checks::luhn_valid(&number) {
                return number;
            }
        }
    }

    fn fill(&mut self, kind: &str) {
        if kind.starts_with("NEG_") {
            self.hard_negatives += 1;
        }
        let rng = &mut *self.rng;
        match kind {
            "NAME" => {
                let name = format!("{}{}", rng.pick(SURNAMES), rng.pick(GIVEN_NAMES));
                self.push_label(Category::Name, &name);
            }
            "NAME_UNLISTED" => {
                let name = *rng.pick(UNLISTED_CHINESE_NAMES);
                self.push_label(Category::Name, name);
            }
            "NAME_EN" => {
                let name = format!("{} {}", rng.pick(ENGLISH_FIRST), rng.pick(ENGLISH_LAST));
                self.push_label(Category::Name, &name);
            }
            "NAME_EN_UNLISTED" => {
                let name = *rng.pick(UNLISTED_ENGLISH_LAST);
                self.push_label(Category::Name, name);
            }
            "ID" => {
                let id = self.resident_id(false);
                self.push_label(Category::ResidentId, &id);
            }
            "ID_TYPO" => {
                let id = self.resident_id(true);
                self.push_label(Category::ResidentId, &id);
            }
            "ID15" => {
                let id = self.legacy_id();
                self.push_label(Category::ResidentId, &id);
            }
            "MOBILE" => {
                let number = self.mobile();
                self.push_label(Category::Mobile, &number);
            }
            "LANDLINE" => {
                let number = self.landline();
                self.push_label(Category::Landline, &number);
            }
            "EMAIL" => {
                let mut email = format!(
                    "{}{}@{}",
                    rng.pick(EMAIL_USERS),
                    rng.range(1, 99),
                    rng.pick(EMAIL_DOMAINS)
                );
                if rng.chance(10) {
                    email = email.to_uppercase();
                }
                self.push_label(Category::Email, &email);
            }
            "CARD" => {
                let card = self.bank_card();
                self.push_label(Category::BankCard, &card);
            }
            "MRN" => {
                let number = if rng.chance(30) {
                    format!("MR{}", rng.digits(8))
                } else {
                    format!("{}{}", rng.range(1, 9), rng.digits(6))
                };
                self.push_label(Category::Record("medical_record".to_owned()), &number);
            }
            "INPATIENT" => {
                let number = format!("{}{}", rng.range(2015, 2025), rng.digits(6));
                self.push_label(Category::Record("inpatient".to_owned()), &number);
            }
            "INSURANCE" => {
                let number = format!(
                    "{}{}",
                    rng.pick(&["1101", "4401", "3301", "YB"]),
                    rng.digits(10)
                );
                self.push_label(Category::Record("insurance".to_owned()), &number);
            }
            "ADDRESS" => {
                let address = self.address_chinese();
                self.push_label(Category::Address, &address);
            }
            "ADDRESS_EN" => {
                let address = format!(
                    "{} {} {}",
                    rng.range(1, 2400),
                    rng.pick(STREETS_EN),
                    rng.pick(STREET_KINDS_EN)
                );
                self.push_label(Category::Address, &address);
            }
            "DATE" => {
                let date = self.date();
                self.push_label(Category::Date, &date);
            }
            "NEG_LAB" => self.text.push_str(&rng.range(40, 400).to_string()),
            "NEG_SMALL" => self.text.push_str(&rng.range(1, 23).to_string()),
            "NEG_DECIMAL" => {
                let value = format!("{}.{}", rng.range(2, 15), rng.below(10));
                self.text.push_str(&value);
            }
            "NEG_BP" => {
                let value = format!("{}/{}", rng.range(90, 180), rng.range(50, 110));
                self.text.push_str(&value);
            }
            "NEG_DOSE" => {
                let doses: [&str; 4] = ["250", "500", "850", "1000"];
                let dose: &&str = rng.pick(&doses);
                self.text.push_str(dose);
            }
            "NEG_SPECIMEN" => {
                // Twelve digits: too short for a card or an ID.
                let value = format!("{}{}", rng.range(1, 9), rng.digits(11));
                self.text.push_str(&value);
            }
            "NEG_INPATIENT_LIKE" => {
                let value = format!("{}{}", rng.range(2015, 2025), rng.digits(6));
                self.text.push_str(&value);
            }
            "NEG_LOT" => {
                let value = format!("B{}", rng.digits(9));
                self.text.push_str(&value);
            }
            "NEG_COMPACT_DATE" => {
                let date = checks::CivilDate::from_days(rng.range(0, 20_000) as i64 - 10_000);
                let value = format!("{:04}{:02}{:02}", date.year, date.month, date.day);
                self.text.push_str(&value);
            }
            "NEG_DEVICE11" => {
                // Eleven digits starting 10–12: not a mobile.
                let value = format!("1{}{}", rng.range(0, 2), rng.digits(9));
                self.text.push_str(&value);
            }
            "NEG_SERIAL16" => loop {
                // Sixteen digits failing Luhn, with no ID shape.
                let value = format!("9{}", rng.digits(15));
                if !checks::luhn_valid(&value) {
                    self.text.push_str(&value);
                    break;
                }
            },
            "NEG_ORDER18" => {
                let number = self.order_number();
                self.text.push_str(&number);
            }
            "NAME_UNMARKED" => {
                let name = *rng.pick(UNLISTED_CHINESE_NAMES);
                self.push_label(Category::Name, name);
            }
            "NAME_EN_UNMARKED" => {
                let name = format!(
                    "{} {}",
                    rng.pick(ENGLISH_FIRST),
                    rng.pick(UNLISTED_ENGLISH_LAST)
                );
                self.push_label(Category::Name, &name);
            }
            "MOBILE_DOTTED" => {
                let number = format!("1{}{}", rng.range(3, 9), rng.digits(9));
                let dotted = format!("{}.{}.{}", &number[..3], &number[3..7], &number[7..]);
                self.push_label(Category::Mobile, &dotted);
            }
            "LANDLINE_SPACED" => {
                let number = format!("021 {}{} {}", rng.range(2, 8), rng.digits(3), rng.digits(4));
                self.push_label(Category::Landline, &number);
            }
            "ID_DASHED" => {
                let id = self.resident_id(false).replace(' ', "");
                let dashed = format!("{}-{}-{}", &id[..6], &id[6..14], &id[14..]);
                self.push_label(Category::ResidentId, &dashed);
            }
            "EMAIL_OBFUSCATED" => {
                let email = format!(
                    "{} at {} dot com",
                    rng.pick(EMAIL_USERS),
                    rng.pick(&["163", "qq"])
                );
                self.push_label(Category::Email, &email);
            }
            "ADDRESS_PARTIAL" => {
                let address = format!(
                    "{}市{}区{}小区",
                    rng.pick(CITIES),
                    rng.pick(DISTRICTS),
                    rng.pick(ROADS)
                );
                self.push_label(Category::Address, &address);
            }
            "DATE_DOTTED" => {
                let date = checks::CivilDate::from_days(rng.range(0, 20_000) as i64);
                let dotted = format!("{:04}.{:02}.{:02}", date.year, date.month, date.day);
                self.push_label(Category::Date, &dotted);
            }
            "DATE_ENGLISH" => {
                const MONTHS: [&str; 12] = [
                    "January",
                    "February",
                    "March",
                    "April",
                    "May",
                    "June",
                    "July",
                    "August",
                    "September",
                    "October",
                    "November",
                    "December",
                ];
                let date = checks::CivilDate::from_days(rng.range(0, 20_000) as i64);
                let written = format!(
                    "{} {}, {}",
                    MONTHS[date.month as usize - 1],
                    date.day,
                    date.year
                );
                self.push_label(Category::Date, &written);
            }
            other => panic!(
                "corpus template names the unknown slot `{other}` (a bug in the template table)"
            ),
        }
    }

    fn template(&mut self, template: &str) {
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            self.text.push_str(&rest[..open]);
            let close = open + rest[open..].find('}').expect("placeholders are closed");
            self.fill(&rest[open + 1..close]);
            rest = &rest[close + 1..];
        }
        self.text.push_str(rest);
    }
}

/// Generates `n_records` labelled records from `seed`; each record joins two
/// to four sentences, Chinese or English (sometimes both).
pub fn corpus(seed: u64, n_records: usize) -> Vec<LabelledRecord> {
    generate(seed, n_records, CHINESE_TEMPLATES, ENGLISH_TEMPLATES)
}

/// Like [`corpus`], with the harder forms of `STRESS_TEMPLATES` in place of
/// the English sentences.
pub fn stress_corpus(seed: u64, n_records: usize) -> Vec<LabelledRecord> {
    generate(seed, n_records, CHINESE_TEMPLATES, STRESS_TEMPLATES)
}

fn generate(
    seed: u64,
    n_records: usize,
    chinese_templates: &[&str],
    other_templates: &[&str],
) -> Vec<LabelledRecord> {
    let mut rng = Rng(crate::SplitMix64::new(seed));
    (0..n_records)
        .map(|index| {
            let n_sentences = 2 + rng.below(3);
            let mut builder = Builder {
                rng: &mut rng,
                text: String::new(),
                labels: Vec::new(),
                hard_negatives: 0,
            };
            for sentence in 0..n_sentences {
                let english = builder.rng.chance(35);
                let template = if english {
                    *builder.rng.pick(other_templates)
                } else {
                    *builder.rng.pick(chinese_templates)
                };
                if sentence > 0 && english {
                    builder.text.push(' ');
                }
                builder.template(template);
            }
            LabelledRecord {
                key: format!("record-{index}"),
                text: builder.text,
                labels: builder.labels,
                hard_negatives: builder.hard_negatives,
            }
        })
        .collect()
}

/// Counts for one category.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scores {
    /// Labelled identifiers.
    pub labelled: usize,
    /// Labelled identifiers wholly covered by a detection of the same category.
    pub recalled: usize,
    /// Labelled identifiers not wholly covered by any detection (they leak).
    pub leaked: usize,
    /// Detections of this category.
    pub detected: usize,
    /// Detections that overlap a label of the same category.
    pub correct: usize,
}

impl Scores {
    pub fn recall(&self) -> f64 {
        if self.labelled == 0 {
            1.0
        } else {
            self.recalled as f64 / self.labelled as f64
        }
    }
    pub fn precision(&self) -> f64 {
        if self.detected == 0 {
            1.0
        } else {
            self.correct as f64 / self.detected as f64
        }
    }
    fn add(&mut self, other: &Scores) {
        self.labelled += other.labelled;
        self.recalled += other.recalled;
        self.leaked += other.leaked;
        self.detected += other.detected;
        self.correct += other.correct;
    }
}

/// Per-category and overall scores of a de-identifier on a corpus.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evaluation {
    pub per_category: BTreeMap<Category, Scores>,
    pub overall: Scores,
}

impl fmt::Display for Evaluation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<16} {:>8} {:>8} {:>7} {:>10} {:>8}",
            "category", "labelled", "detected", "leaked", "precision", "recall"
        )?;
        let rows = self
            .per_category
            .iter()
            .map(|(category, scores)| (category.key(), scores))
            .chain([("overall", &self.overall)]);
        for (name, scores) in rows {
            writeln!(
                f,
                "{name:<16} {:>8} {:>8} {:>7} {:>10.4} {:>8.4}",
                scores.labelled,
                scores.detected,
                scores.leaked,
                scores.precision(),
                scores.recall()
            )?;
        }
        Ok(())
    }
}

/// Runs `deidentifier` over `corpus` and scores it against the labels.
pub fn evaluate(deidentifier: &Deidentifier, corpus: &[LabelledRecord]) -> Evaluation {
    let mut evaluation = Evaluation::default();
    for record in corpus {
        let spans = deidentifier.find(&record.text);
        for label in &record.labels {
            let scores = evaluation
                .per_category
                .entry(label.category.clone())
                .or_default();
            scores.labelled += 1;
            let covers = |span: &&crate::Span| span.start <= label.start && span.end >= label.end;
            if spans
                .iter()
                .filter(covers)
                .any(|span| span.category == label.category)
            {
                scores.recalled += 1;
            }
            if !spans.iter().any(|span| covers(&span)) {
                scores.leaked += 1;
            }
        }
        for span in &spans {
            let scores = evaluation
                .per_category
                .entry(span.category.clone())
                .or_default();
            scores.detected += 1;
            if record.labels.iter().any(|label| {
                label.category == span.category && label.start < span.end && span.start < label.end
            }) {
                scores.correct += 1;
            }
        }
    }
    for scores in evaluation.per_category.values() {
        evaluation.overall.add(scores);
    }
    evaluation
}
